"""README tables come from the results files (vdu.report): the committed README matches them, a changed
number makes the check fail, and a missing results file is said, not invented."""
import json
import shutil

import pytest

from conftest import REPO
from vdu import report


def test_the_readme_tables_match_the_results_files():
    assert report.main(check=True) == 0


def test_a_changed_number_is_caught_and_rewritten(tmp_path):
    (tmp_path / "results" / "gmm").mkdir(parents=True)
    shutil.copy(REPO / "results" / "gmm" / "duality.json", tmp_path / "results" / "gmm")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report:duality -->\nstale\n<!-- /report -->\noutro\n")
    assert report.main(check=True, readme=readme, root=tmp_path) == 1
    assert report.main(readme=readme, root=tmp_path) == 0
    assert report.main(check=True, readme=readme, root=tmp_path) == 0
    d = json.loads((tmp_path / "results" / "gmm" / "duality.json").read_text())
    d["exact"]["ru"]["lambda"] = [0.5]
    (tmp_path / "results" / "gmm" / "duality.json").write_text(json.dumps(d))
    assert report.main(check=True, readme=readme, root=tmp_path) == 1
    report.main(readme=readme, root=tmp_path)
    text = readme.read_text()
    assert "| exact dual optimum lambda* | 0.5 |" in text and text.startswith("intro\n") and text.endswith("outro\n")


def test_missing_results_and_unknown_blocks(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- report:data -->\n<!-- /report -->\n")
    report.main(readme=readme, root=tmp_path)
    assert "not written yet" in readme.read_text()
    readme.write_text("<!-- report:nosuch -->\n<!-- /report -->\n")
    with pytest.raises(ValueError, match="no table"):
        report.main(readme=readme, root=tmp_path)


def test_a_target_is_met_only_by_the_whole_interval(tmp_path):
    """The VDU class table marks PUL >= 95% with u-FID <= 1.5x in bold only when PUL's interval lies above 95
    and u-FID's below 1.5x the pretrained value; without intervals (older runs) the point decides."""
    row = dict(config="vdu-function", forget_class=1, steps=40, stop="stop_rule", unlearn_s=90.0, pul=98.0,
               u_fid_ratio=1.0, forget_share_before=0.1, u_fid_before=10.0, u_fid_after=10.0,
               confident_share_before=0.6, confident_share_after=0.6)
    rows = [dict(row, forget_class=0, pul_ci=[96.0, 100.0], u_fid_after_ci=[9.0, 14.0]),   # met
            dict(row, forget_class=1, pul_ci=[93.0, 100.0], u_fid_after_ci=[9.0, 14.0]),   # PUL interval too wide
            dict(row, forget_class=2, pul_ci=[96.0, 100.0], u_fid_after_ci=[9.0, 16.0]),   # u-FID up to 1.6x
            dict(row, forget_class=3)]                                                    # no intervals: the point
    (tmp_path / "results" / "mnist").mkdir(parents=True)
    (tmp_path / "results" / "mnist" / "vdu_unlearning.json").write_text(json.dumps(dict(
        classes=rows, evaluation=dict(samples=256, table_samples=1500, ddim_steps=20, seed_bank=0), machine="m",
        notebook_wall_s=60.0, written="now")))
    table = report.vdu_classes(tmp_path)
    bold = {line.split(" | ")[0].strip("| ") for line in table.splitlines() if "**98.0" in line}
    assert bold == {"0", "3"}, table
    assert "2 / 4 (classes 0, 3)" in table and "1,500 samples per model" in table


def test_the_benchmark_table_reads_the_notebooks_results(tmp_path):
    """The benchmark block renders the summary the notebook wrote (a file written here), and before the full run
    exists it says how many rows are cached instead of showing numbers."""
    readme = tmp_path / "README.md"
    readme.write_text("<!-- report:benchmark -->\n<!-- /report -->\n")
    report.main(readme=readme, root=tmp_path)
    assert "no rows cached either" in readme.read_text()
    rows = tmp_path / "results" / "mnist" / "rows" / "benchmark"
    rows.mkdir(parents=True)
    loop = dict(stop_forget_ratio=1.3)
    (rows / "ref.json").write_text(json.dumps(dict(spec=dict(entry="pretrained-relearn", kind="uncond", c=1),
                                                    row=dict(forget_share=0.5))))
    for c, extra, pul in [(1, {}, 96.25), (8, {}, 90.0), (1, dict(stop_forget_ratio=2.0), 99.0), (3, {}, 80.0),
                          (5, {}, 70.0)]:
        (rows / f"{c}-{len(extra)}.json").write_text(json.dumps(dict(
            spec=dict(entry=dict(method="neggrad"), kind="uncond", c=c, extra=extra, loop=loop), commit="abc1234",
            row=dict(config="neggrad", data="forget-only", pul=pul, pul_ci=[pul - 5, 100.0], u_fid_ratio=1.04,
                     relearn_forget_share=0.25))))
    (rows / "damaged.json").write_text("{")
    report.main(readme=readme, root=tmp_path)
    text = readme.read_text()
    assert ("| uncond | forget-only | `neggrad` | 1.3 | 96.2 [91.2, 100.0], 1.04x | 90.0 [85.0, 100.0], 1.04x | — | "
            "75.0 (2: 70.0 to 80.0) | 0.50 |") in text, text
    assert "| `neggrad` | 2 | 99.0 [94.0, 100.0], 1.04x | — | — | — | 0.50 |" in text, text
    assert "5 method rows and 1 relearning reference;" in text and "1 unreadable files skipped" in text
    assert "not written yet" in text
    s = dict(model="uncond", data="forget-only", entry="vdu-function", method="vdu", classes=3, pul=97.5,
             forget_share=0.002, u_fid_ratio=1.1, confident=0.58, confident_before=0.59, steps=40.0, unlearn_s=95.0,
             relearn=0.4, at_target=2)
    r = dict(model="uncond", data="forget-only", config="neggrad", forget_class=1, pul=96.25, pul_ci=[91.25, 100.0],
             u_fid_ratio=1.04, relearn_vs_pretrained=0.5, forget_nll_before=1.0, retain_nll_before=2.0)
    (tmp_path / "results" / "mnist" / "benchmark.json").write_text(json.dumps(dict(
        rows=[r, dict(r, forget_class=0, pul=-10.0, pul_ci=None, u_fid_ratio=5.0, relearn_vs_pretrained=1.25)],
        pareto=[dict(r, stop_forget_ratio=1.3), dict(r, stop_forget_ratio=2.0, pul=99.0, pul_ci=None)],
        loop=loop, entries=dict(neggrad=dict(method="neggrad")),
        summary=[dict(s, forget_nll_after=1.5, retain_nll_after=1.25), dict(s, entry="neggrad", relearn=None)],
        target=dict(pul=95.0, u_fid_ratio=1.2),
        evaluation=dict(samples=1200, sampler="DDIM 20", seed_bank=0), relearn=dict(images=16, steps=50),
        machine="m", notebook_wall_s=600.0, rows_from_cache=5, written="now")))
    report.main(readme=readme, root=tmp_path)
    text = readme.read_text()
    row = ("| uncond | forget-only | `vdu-function` | 3 | 97.5 | 0.002 | 1.10 | 0.58 (before 0.59) | 1.500 / 1.250 | 0.40 | "
           "40 | 95 | 2 / 3 |")
    assert row in text, text
    assert "| — |" in text and "1,200 samples per model (DDIM 20" in text and "5 rows from earlier sessions" in text
    assert ("| uncond | forget-only | `neggrad` | 1.3 | 96.2 [91.2, 100.0], 1.04x | — | -10.0, 5.00x | — | "
            "0.50–1.25 |") in text, text                     # the Pareto row at the entry's own ratio is the same row
    assert "| uncond | forget-only | `neggrad` | 2 | 99.0, 1.04x | — | — | — | 0.50 |" in text, text
    assert "| 0.58 (before 0.59) | — | — | 40 |" in text, text          # no NLL, no relearning: dashes
    assert "mean over its classes: uncond 1.000 / 2.000)" in text, text


def test_base_model_table_reads_the_cards(tmp_path):
    assert "No base models for cifar10 or tinyimagenet" in report.base_models(tmp_path)
    folder = tmp_path / "checkpoints" / "cifar10" / "ddpm"
    folder.mkdir(parents=True)
    card = {"train_steps": 3000, "train_finished": False, "train_wall_s": 7200.0, "train_device": "cpu",
            "train_config": {"steps": 14000, "batch_size": 64},
            "metrics": {"samples": {"n": 1000, "sampler": "DDIM 50 steps, eta 0"}, "confident_share": 0.123,
                        "confident_share_ci95_wilson": [0.104, 0.145], "class_shares": [0.04] + [0.96 / 9] * 9,
                        "domain_fid": 41.5, "bits_per_dim": {"mean": 3.9, "sem": 0.02, "images": 256,
                                                             "t_terms": "stratified, 100"},
                        "quality_bar": {"confident_share_ok": False, "class_shares_ok": False, "met": False,
                                        "confident_min": 0.1724,
                                        "rule": "confident(max p >= 0.9) >= 17.2% (half of ...), every class in [5%, 15%]"}}}
    (folder / "card.json").write_text(json.dumps(card))
    table = report.base_models(tmp_path)
    row = next(l for l in table.splitlines() if "checkpoints/cifar10/ddpm" in l)
    assert "3,000 x 64 steps of 14,000 planned (unfinished)" in row and "2.00 h (cpu)" in row
    assert "12.3% [10.4%, 14.5%]" in row and ">= 17.2%" in row and "4.0%-10.7%" in row
    assert "no (confident_share, class_shares)" in row and "No base model for tinyimagenet yet" in table
    assert "256 test images, t-terms stratified, 100" in table
    card.update(train_config=None, train_wall_s=None)          # a folder made without train.json
    (folder / "card.json").write_text(json.dumps(card))
    row = next(l for l in report.base_models(tmp_path).splitlines() if "checkpoints/cifar10/ddpm" in l)
    assert row.startswith("| `checkpoints/cifar10/ddpm` | ? | ? |")


def test_a_datasets_benchmark_table_heads_its_own_classes(tmp_path):
    """The CIFAR-10 block reads results/cifar10/benchmark.json and heads the per-class table with the classes that
    run recorded, by id and name."""
    readme = tmp_path / "README.md"
    readme.write_text("<!-- report:benchmark_cifar10 -->\n<!-- /report -->\n")
    report.main(readme=readme, root=tmp_path)
    assert "results/cifar10/benchmark.json not written yet (`make run-all DATASETS=cifar10" in readme.read_text()
    r = dict(model="uncond", data="forget-only", config="fu", forget_class=6, pul=91.0, pul_ci=[85.0, 96.0],
             u_fid_ratio=1.1, relearn_vs_pretrained=0.9)
    s = dict(model="uncond", data="retain", entry="fu", method="fu", classes=2, pul=80.0, forget_share=0.02,
             u_fid_ratio=1.1, confident=0.2, confident_before=0.2, steps=80.0, unlearn_s=300.0, relearn=0.9,
             at_target=0)
    (tmp_path / "results" / "cifar10").mkdir(parents=True)
    (tmp_path / "results" / "cifar10" / "benchmark.json").write_text(json.dumps(dict(
        rows=[r, dict(r, forget_class=3, pul=69.0, pul_ci=[60.0, 75.0])], pareto=[], summary=[s],
        loop=dict(stop_forget_ratio=1.3), entries=dict(fu=dict(method="fu")), target=dict(pul=95.0, u_fid_ratio=1.2),
        classes=dict(first=6, subset=[3, 8], all=[], names=["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                             "frog", "horse", "ship", "truck"]),
        evaluation=dict(samples=1200, sampler="DDIM 20", seed_bank=0), relearn=dict(images=16, steps=50),
        machine="m", notebook_wall_s=600.0, rows_from_cache=0, written="now")))
    report.main(readme=readme, root=tmp_path)
    text = readme.read_text()
    assert "| class 6 (frog) | class 3 (cat) | class 8 (ship) |" in text, text
    assert "| uncond | forget-only | `fu` | 1.3 | 91.0 [85.0, 96.0], 1.10x | 69.0 [60.0, 75.0], 1.10x | — | — | 0.90–0.90 |" \
        in text, text
    assert "relearning, classes 6, 3, 8" in text
