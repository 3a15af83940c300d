"""`make run-all` (vdu.notebook.run_all): every (notebook, dataset) of the matrix runs its full profile once;
an interrupted run resumes without redoing finished notebooks; a failed one is kept for inspection."""
import json

import nbformat
import pytest

from vdu import notebook
from vdu.notebook import finished, run_all


def _toy(root, name, body):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('profile = "smoke"\ndataset = "none"\nmarker = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    (root / "notebooks" / "params").mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, root / "notebooks" / f"{name}.ipynb")
    (root / "notebooks" / "params" / f"{name}-full.yaml").write_text(f"profile: full\nmarker: {root / 'ok'}\n")


def test_run_all_resumes_and_keeps_failures(tmp_path, monkeypatch):
    pytest.importorskip("papermill")
    monkeypatch.setitem(notebook.MATRIX, "toy", ["first", "second"])
    _toy(tmp_path, "first", "print('first ran on', dataset)")
    _toy(tmp_path, "second", "import os\nassert os.path.exists(marker), 'not yet'")   # fails until 'ok' exists
    out = tmp_path / "executed"
    with pytest.raises(Exception, match="not yet"):
        run_all(["toy"], root=tmp_path, out=out, log=lambda *_: None)
    assert finished(out / "first-toy.ipynb") and not (out / "second-toy.ipynb").exists()
    assert (out / "second-toy.failed.ipynb").exists()            # kept for inspection
    first_time = (out / "first-toy.ipynb").stat().st_mtime_ns
    (tmp_path / "ok").write_text("")
    rows = run_all(["toy"], root=tmp_path, out=out, log=lambda *_: None)
    assert [r["status"] for r in rows] == ["skipped", "ran"]     # resumed: the finished one is not redone
    assert (out / "first-toy.ipynb").stat().st_mtime_ns == first_time and finished(out / "second-toy.ipynb")
    assert not (out / "second-toy.failed.ipynb").exists()       # the earlier failure is cleared by the success
    meta = json.loads((out / "second-toy.ipynb").read_text())["metadata"]["papermill"]["parameters"]
    assert meta["profile"] == "full" and meta["dataset"] == "toy"
    rows = run_all(["toy"], ["second"], force=True, root=tmp_path, out=out, log=lambda *_: None)
    assert [(r["notebook"], r["status"]) for r in rows] == [("second", "ran")]
    with pytest.raises(ValueError, match="unknown dataset"):
        run_all(["cifar"], root=tmp_path, out=out)
    with pytest.raises(ValueError, match="unknown notebook"):
        run_all(["toy"], ["third"], root=tmp_path, out=out)


def test_gpu_profiles_override_the_full_profile_with_parameters_the_notebook_has():
    """Every params/<notebook>-gpu.yaml belongs to a notebook of the matrix, sets device cuda, and names only
    parameters of that notebook's parameters cell (a typo would only show on a GPU machine, an hour in)."""
    import ast
    from pathlib import Path
    root = Path(notebook.__file__).resolve().parents[1]
    gpu = sorted((root / "notebooks" / "params").glob("*-gpu.yaml"))
    assert gpu, "no GPU profile"
    known = {nb for nbs in notebook.MATRIX.values() for nb in nbs}
    for path in gpu:
        nb = path.name[:-len("-gpu.yaml")]
        assert nb in known, path.name
        src = (root / "notebooks" / f"{nb}.py").read_text()
        cell = src.split('# %% tags=["parameters"]\n', 1)[1].split("# %%", 1)[0]
        names = {t.id for node in ast.parse(cell).body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name)}
        over = notebook._gpu_params(root, nb)
        assert over["device"] == "cuda" and set(over) <= names, (nb, set(over) - names)
        merged = notebook._full_params(root, nb, "mnist", gpu=True)
        full = notebook._full_params(root, nb, "mnist")
        assert merged == {**full, **over} and merged["profile"] == "full" and "device" not in full


def test_the_gpu_profile_needs_cuda(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(notebook.NoGPUError, match="no CUDA"):
        run_all(["gmm"], root=tmp_path, out=tmp_path / "executed", gpu=True)
    monkeypatch.setitem(notebook.MATRIX, "toy", ["first"])
    _toy(tmp_path, "first", "print(1)")
    (tmp_path / "notebooks" / "params" / "first-gpu.yaml").write_text("device: cuda\n")
    lines = []
    run_all(["toy"], root=tmp_path, out=tmp_path / "executed", gpu=True, dry_run=True, log=lines.append)
    assert lines == ["first [toy]: would run the GPU profile -> first-toy.ipynb"]


def test_row_cache_returns_a_row_only_for_the_same_settings_and_weights(tmp_path):
    """The benchmark's rows on disk (vdu.results.RowCache): an interrupted full run resumes without redoing them,
    and a changed setting, model or damaged file is recomputed, never reused."""
    import torch
    from vdu.results import RowCache, file_digest
    w = tmp_path / "w.bin"
    w.write_bytes(b"weights v1")
    cache = RowCache(tmp_path / "cache", weights=file_digest(w), evaluation={"n_samples": 1200})
    from vdu.evaluation import EvalConfig
    spec = dict(entry={"method": "neggrad", "lr": 3e-5}, c=1, extra={}, evaluation=EvalConfig(1200))   # a dataclass
    assert cache.get(**spec) is None
    grid = torch.rand(36, 1, 28, 28)
    cache.put({"pul": 97.5, "pul_ci": torch.tensor([95.0, 99.5]), "stop": "stop_rule"}, grid, **spec)  # a tensor
    row, g = RowCache(tmp_path / "cache", weights=file_digest(w), evaluation={"n_samples": 1200}).get(**spec)
    assert row == {"pul": 97.5, "pul_ci": [95.0, 99.5], "stop": "stop_rule"} and torch.equal(g, grid)
    assert cache.get(**{**spec, "c": 8}) is None                                  # another class
    assert cache.get(**{**spec, "evaluation": EvalConfig(500)}) is None            # another evaluation
    assert cache.get(**{**spec, "entry": {"method": "neggrad", "lr": 1e-5}}) is None   # another option
    assert RowCache(tmp_path / "cache", weights=file_digest(w), evaluation={"n_samples": 500}).get(**spec) is None
    w.write_bytes(b"weights v2")                                                   # a retrained model
    assert RowCache(tmp_path / "cache", weights=file_digest(w), evaluation={"n_samples": 1200}).get(**spec) is None
    (tmp_path / "cache" / f"{cache.key(**spec)}.json").write_text('{"row": ')    # an interrupted write elsewhere
    assert cache.get(**spec) is None
    assert RowCache(None).get(**spec) is None and RowCache(None).put({}, **spec) is None   # off
    cache.put({"pul": 90.0}, grid, **spec)
    (tmp_path / "cache" / f"{cache.key(**spec)}.pt").write_bytes(b"not a tensor")   # unreadable grid
    assert cache.get(with_tensor=True, **spec) is None and cache.get(**spec)[0] == {"pul": 90.0}
    (tmp_path / "cache" / f"{cache.key(**spec)}.pt").unlink()                       # missing grid
    assert cache.get(with_tensor=True, **spec) is None


def test_what_a_cached_row_is_keyed_by(tmp_path):
    """A model folder's digest follows its weights and configs but not its card; the code digest follows the
    sources of the modules a row is computed by."""
    from vdu.results import folder_digest, source_digest
    m = tmp_path / "model"
    (m / "unet").mkdir(parents=True)
    (m / "unet" / "w.safetensors").write_bytes(b"w1")
    (m / "unet" / "config.json").write_text("{}")
    d = folder_digest(m)
    (m / "card.json").write_text('{"notes": "new"}')
    (m / "samples.png").write_bytes(b"png")
    assert folder_digest(m) == d
    (m / "unet" / "config.json").write_text('{"layers": 2}')
    assert folder_digest(m) != d
    (tmp_path / "vdu" / "methods").mkdir(parents=True)
    (tmp_path / "vdu" / "methods" / "a.py").write_text("x = 1\n")
    (tmp_path / "vdu" / "loop.py").write_text("y = 1\n")
    code = source_digest(["vdu/methods", "vdu/loop.py"], root=tmp_path)
    (tmp_path / "vdu" / "other.py").write_text("z = 1\n")                       # not a row's module
    assert source_digest(["vdu/methods", "vdu/loop.py"], root=tmp_path) == code
    (tmp_path / "vdu" / "methods" / "a.py").write_text("x = 2\n")
    assert source_digest(["vdu/methods", "vdu/loop.py"], root=tmp_path) != code


def test_row_cache_computes_a_row_once(tmp_path):
    """``RowCache.row``: the first call computes and stores the row, a later run with the same spec reads it."""
    from vdu.results import RowCache
    calls = []

    def compute():
        calls.append(1)
        return {"forget_rate": [0.02], "stop": "max_steps"}

    first = RowCache(tmp_path / "c", code="v1").row(compute, method="lu", eps=0.05)
    again = RowCache(tmp_path / "c", code="v1")
    assert again.row(compute, method="lu", eps=0.05) == first and len(calls) == 1 and again.hits == 1
    RowCache(tmp_path / "c", code="v2").row(compute, method="lu", eps=0.05)          # changed code: recomputed
    RowCache(None).row(compute, method="lu", eps=0.05)                               # cache off: always computed
    assert len(calls) == 3


def test_dataset_blocks_layer_between_the_full_and_the_gpu_profile(tmp_path):
    """params/<nb>-<ds>.yaml replaces the full profile's keys on that dataset only; the GPU profile comes last."""
    params = tmp_path / "notebooks" / "params"
    params.mkdir(parents=True)
    (params / "nb-full.yaml").write_text("profile: full\nn: 1\nclasses: [1, 8]\ncache: results/mnist\n")
    (params / "nb-cifar10.yaml").write_text("classes: [6]\ncache: results/cifar10\n")
    (params / "nb-gpu.yaml").write_text("device: cuda\nn: 5\n")
    assert notebook._full_params(tmp_path, "nb", "mnist") == dict(profile="full", n=1, classes=[1, 8],
                                                                  cache="results/mnist", dataset="mnist")
    assert notebook._full_params(tmp_path, "nb", "cifar10") == dict(profile="full", n=1, classes=[6],
                                                                    cache="results/cifar10", dataset="cifar10")
    assert notebook._full_params(tmp_path, "nb", "cifar10", gpu=True) == dict(
        profile="full", n=5, classes=[6], cache="results/cifar10", device="cuda", dataset="cifar10")


def test_every_dataset_block_names_parameters_its_notebook_has():
    """Each params/<nb>-<ds>.yaml is a cell of the matrix and names only parameters of the notebook; the benchmark's
    blocks point at that dataset's own models, cache folder and classes (a typo would show hours into a run)."""
    import ast
    from pathlib import Path
    import yaml
    root = Path(notebook.__file__).resolve().parents[1]
    blocks = [p for p in sorted((root / "notebooks" / "params").glob("*.yaml"))
              if not p.name.endswith(("-full.yaml", "-gpu.yaml"))]
    assert {p.name for p in blocks} >= {"benchmark-cifar10.yaml", "benchmark-tinyimagenet.yaml"}
    for path in blocks:
        nb, ds = path.stem.rsplit("-", 1)
        assert ds in notebook.MATRIX and nb in notebook.MATRIX[ds], path.name
        src = (root / "notebooks" / f"{nb}.py").read_text()
        cell = src.split('# %% tags=["parameters"]\n', 1)[1].split("# %%", 1)[0]
        names = {t.id for node in ast.parse(cell).body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name)}
        block = yaml.safe_load(path.read_text())
        assert set(block) <= names, (path.name, set(block) - names)
        p = notebook._full_params(root, nb, ds)
        if nb == "benchmark":
            assert all(f.startswith(f"checkpoints/{ds}/") and (root / f / "unet").is_dir()
                       for f in p["models"].values()), p["models"]
            assert p["cache_dir"].startswith(f"results/{ds}/")
            assert {m for e in p["entries"].values() for m in e["models"]} <= set(p["models"])
            assert all(0 <= c < 10 for c in [p["first_class"], *p["subset"], *p["all_classes"]])


@pytest.mark.slow
def test_the_benchmark_runs_on_the_cifar10_block(tmp_path):
    """The benchmark notebook (smoke sizes) on CIFAR-10's block of the matrix: its committed base model, evaluator
    and real data, the frog class, every entry of the block (the posterior-only VDU where the model has its
    posterior); the results file records the classes by name."""
    pm = pytest.importorskip("papermill")
    from pathlib import Path
    from vdu.data import data_root
    if not (data_root() / "cifar10.npz").exists():
        pytest.skip("cifar10.npz is not in the data folder")
    root = Path(notebook.__file__).resolve().parents[1]
    block = notebook._dataset_params(root, "benchmark", "cifar10")
    has_posterior = (root / block["models"]["uncond"] / "posterior.safetensors").exists()
    entries = {name: {**e, **({"replay_samples": 8, "replay_ddim_steps": 2} if "replay_samples" in e else {})}
               for name, e in block["entries"].items() if e.get("stability") != "posterior" or has_posterior}
    out = root / "results" / "cifar10" / "smoke" / "benchmark.json"
    out.unlink(missing_ok=True)
    if not has_posterior:             # the paper's VDU without its posterior: refused in the first cell, by name
        with pytest.raises(pm.PapermillExecutionError, match="entry 'vdu' needs the posterior of checkpoints/cifar10"):
            pm.execute_notebook(str(root / "notebooks" / "benchmark.ipynb"), str(tmp_path / "refused.ipynb"),
                                cwd=str(root / "notebooks"), progress_bar=False,
                                parameters=dict(dataset="cifar10", models=block["models"], entries=block["entries"]))
        assert not out.exists()
    pm.execute_notebook(str(root / "notebooks" / "benchmark.ipynb"), str(tmp_path / "out.ipynb"),
                        cwd=str(root / "notebooks"), progress_bar=False,
                        parameters=dict(dataset="cifar10", models=block["models"], entries=entries, pareto={},
                                        first_class=block["first_class"], n_reference=64, n_samples=24))
    d = json.loads(out.read_text())
    assert d["dataset"] == "cifar10" and d["profile"] == "smoke"
    assert {(r["config"], r["forget_class"]) for r in d["rows"]} == {(n, 6) for n in entries}
    assert d["classes"]["names"][d["classes"]["first"]] == "frog"
    assert all(r["n_samples"] == 24 and 0 <= r["forget_share_before"] <= 1 for r in d["rows"])


def test_compact_figures_keeps_the_picture_and_the_run_record(tmp_path):
    """The executed notebooks' figures become palette PNGs: smaller, the same size in pixels, close in colour;
    the papermill record (what `finished` reads) survives, and a second pass changes nothing."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from vdu.notebook import compact_figures
    yy, xx = np.mgrid[0:120, 0:160]
    rgb = np.stack([xx * 255 // 159, yy * 255 // 119, (xx + yy) % 256], -1).astype(np.uint8)
    rgb[40:80, 40:120] = np.random.default_rng(0).integers(0, 256, (40, 80, 3))   # a noisy "sample grid"
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("plot()")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(buf.getvalue()).decode(),
                                                                 "text/plain": "<Figure>"})]
    nb.cells = [cell]
    nb.metadata["papermill"] = {"end_time": "2026-01-01T00:00:00", "exception": None, "parameters": {"profile": "full"}}
    path = tmp_path / "fig.ipynb"
    nbformat.write(nb, path)
    saved = compact_figures(path)
    assert saved > 0 and path.stat().st_size < len(nbformat.writes(nb))
    out = nbformat.read(path, as_version=4).cells[0].outputs[0]["data"]["image/png"]
    im = Image.open(io.BytesIO(base64.b64decode(out)))
    assert im.mode == "P" and im.size == (160, 120)
    diff = np.abs(np.asarray(im.convert("RGB"), dtype=int) - rgb)
    assert diff.mean() < 8, diff.mean()
    assert finished(path)
    assert compact_figures(path) == 0
