"""The one evaluation path (vdu.evaluation) and the notebook parameter check (vdu.notebook)."""
import pytest
import torch

from conftest import tiny_unet
from vdu.data import UnlearnData
from vdu.evaluation import EvalConfig, evaluate, measure
from vdu.models import build_scheduler
from vdu.notebook import check_params


class _Fixed(torch.nn.Module):
    """A stand-in evaluator whose label is the image's mean brightness bucket (known answers)."""

    config = {"num_classes": 10}
    num_features = 2

    def predict(self, x):
        lab = ((x.mean((1, 2, 3)) + 1) / 2 * 10).clamp(0, 9.99).long()
        return lab, torch.ones(len(x))

    def features(self, x):
        return torch.stack([x.mean((1, 2, 3)), x.mean((1, 2, 3)) ** 2], 1)

    def parameters(self, recurse=True):
        return iter([torch.zeros(1)])


def _imgs(levels):
    return torch.stack([torch.full((1, 28, 28), v) for v in levels])


def test_measure_counts_the_forget_class_and_pul():
    ev = _Fixed()
    before = measure(ev, _imgs([-0.85] * 4 + [0.05] * 6), UnlearnData(_imgs([0.0]), forget_class=0))
    after = measure(ev, _imgs([-0.85] * 1 + [0.05] * 9), UnlearnData(_imgs([0.0]), forget_class=0), before=before)
    assert before["forget_share"] == pytest.approx(0.4) and after["forget_share"] == pytest.approx(0.1)
    assert after["pul"] == pytest.approx(75.0)                          # (4 - 1) / 4


def test_non_finite_samples_are_refused_not_scored():
    x = _imgs([0.0] * 4)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        measure(_Fixed(), x, UnlearnData(_imgs([0.0]), forget_class=3))


def test_a_diverged_model_is_refused_by_the_sampler():
    unet = tiny_unet()
    with torch.no_grad():
        next(unet.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite samples"):
        evaluate(unet, build_scheduler(), _Fixed(), EvalConfig(n_samples=2, steps=2))


def test_given_samples_are_not_redrawn():
    x = _imgs([0.05] * 5)
    out, xs = evaluate(tiny_unet(), build_scheduler(), _Fixed(), EvalConfig(n_samples=5, steps=2), samples=x)
    assert xs is x and out["n_samples"] == 5


@pytest.mark.parametrize("bad", [dict(sampler="euler"), dict(n_samples=0), dict(steps=0), dict(nll_timesteps=-1)])
def test_eval_config_refuses_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EvalConfig(**bad)


def test_check_params_names_every_bad_parameter():
    check_params(dict(n=(3, int, 1), lr=(1, float, 0)))               # an int is a fine float
    with pytest.raises(ValueError, match=r"n_forget='abc' must be int.*steps=-1 must be >= 0"):
        check_params(dict(n_forget=("abc", int, 1), steps=(-1, int, 0)))
    with pytest.raises(ValueError, match="flag=True must be int"):
        check_params(dict(flag=(True, int, 0)))


def _class_images(labels, g):
    """Images whose _Fixed label is ``labels`` (brightness bucket), with a little within-bucket jitter."""
    lv = (labels.float() + 0.2 + 0.6 * torch.rand(len(labels), generator=g)) / 10 * 2 - 1
    return lv.view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()


def test_intervals_cover_known_shares_and_pul():
    """A synthetic classifier and known class shares: the forget-class share is 0.1 and each forget-class
    sample survives unlearning with probability 0.1 (true PUL 90%). Over 120 independent sample sets of
    400, the 95% intervals cover the truth in about 95% of them (binomial range 88-100%)."""
    ev, g = _Fixed(), torch.Generator().manual_seed(0)
    data = UnlearnData(_imgs([0.0]), forget_class=3)
    cover_share = cover_pul = 0
    trials = 120
    for i in range(trials):
        before_lab = torch.where(torch.rand(400, generator=g) < 0.1, 3, (torch.randint(0, 9, (400,), generator=g) + 4) % 10)
        after_lab = torch.where((before_lab == 3) & (torch.rand(400, generator=g) > 0.1), 5, before_lab)
        before = measure(ev, _class_images(before_lab, g), data, bootstrap=400, seed=i)
        after = measure(ev, _class_images(after_lab, g), data, before=before, bootstrap=400, seed=i)
        assert torch.equal(before["labels"], before_lab)
        lo, hi = before["forget_share_ci"]
        cover_share += lo <= 0.1 <= hi
        lo, hi = after["pul_ci"]
        cover_pul += lo <= 90.0 <= hi
    assert 0.88 * trials <= cover_share <= trials and 0.86 * trials <= cover_pul <= trials, (cover_share, cover_pul)


def test_frechet_distance_matches_torchmetrics_fid():
    from vdu.evaluation import fid_interval, frechet_distance
    from vdu.metrics import domain_fid
    ev, g = _Fixed(), torch.Generator().manual_seed(1)
    fake = _class_images(torch.randint(0, 10, (300,), generator=g), g)
    real = _class_images(torch.randint(2, 8, (300,), generator=g), g)
    ours = frechet_distance(ev.features(fake), ev.features(real))
    assert ours == pytest.approx(domain_fid(ev, fake, real), rel=1e-3)
    lo, hi = fid_interval(ev, fake, real, n_boot=50)
    assert lo < hi and lo <= ours * 1.2 and hi >= ours * 0.8


def test_samples_needed_resolves_99_from_95():
    from vdu.evaluation import samples_needed
    n = samples_needed(0.1)
    assert 1000 < n < 1300                                              # ~115 forget-class samples
    assert samples_needed(0.05) == pytest.approx(2 * n, rel=0.01)       # half the share, twice the samples
    with pytest.raises(ValueError, match="other < pul"):
        samples_needed(0.1, pul=95, other=99)


def test_evaluate_prompts_scores_every_prompt_and_zero_deviation_from_itself(small_data, evaluator):
    from conftest import tiny_unet
    from vdu.evaluation import EvalConfig, evaluate_prompts
    from vdu.models import build_scheduler
    unet = tiny_unet(conditional=True)
    r = evaluate_prompts(unet, build_scheduler(), evaluator,
                         EvalConfig(n_samples=4, steps=1, bootstrap=200, fid_bootstrap=20),
                         reference=small_data, erased=[3], teacher=unet, kl_images=small_data)
    assert [p["prompt"] for p in r["prompts"]] == list(range(10))
    assert [p["erased"] for p in r["prompts"]].count(True) == 1 and r["prompts"][3]["erased"]
    assert all(p["kl"] == 0.0 for p in r["prompts"]) and all(p["fid"] >= 0 for p in r["prompts"])
    assert r["summary"]["forget_rate_3"] == r["prompts"][3]["label_accuracy"]
    lo, hi = r["prompts"][0]["label_accuracy_ci"]
    assert lo <= r["prompts"][0]["label_accuracy"] <= hi
    assert all(p["fid_ci"][0] <= p["fid_ci"][1] for p in r["prompts"])
    for k in ("label_accuracy", "fid"):      # the retained prompts' mean, with the interval of the mean
        lo, hi = r["summary"][f"{k}_ci"]
        assert lo <= hi and lo <= r["summary"][k] * 1.3 and hi >= r["summary"][k] * 0.7, (k, r["summary"])
    with pytest.raises(ValueError, match="class-conditional"):
        evaluate_prompts(tiny_unet(), build_scheduler(), evaluator)


class _Merged(_Fixed):
    """A second evaluator that disagrees in a known way: it reads bucket 4 as 3."""

    def predict(self, x):
        lab, conf = super().predict(x)
        return torch.where(lab == 4, 3, lab), conf


def test_second_evaluator_gives_its_own_pul_and_the_agreement():
    ev, ev2 = _Fixed(), _Merged()
    data = UnlearnData(_imgs([0.0]), forget_class=3)
    # before: 4 in bucket 3, 2 in bucket 4, 4 in bucket 6; after: 1 in bucket 3, 2 in bucket 4, 7 in bucket 6
    b = measure(ev, _imgs([-0.35] * 4 + [-0.15] * 2 + [0.25] * 4), data, second=ev2, bootstrap=200)
    a = measure(ev, _imgs([-0.35] * 1 + [-0.15] * 2 + [0.25] * 7), data, before=b, second=ev2, bootstrap=200)
    assert b["label_agreement"] == pytest.approx(0.8) and a["label_agreement"] == pytest.approx(0.8)
    assert b["forget_share"] == pytest.approx(0.4) and b["forget_share_second"] == pytest.approx(0.6)
    assert a["pul"] == pytest.approx(75.0) and a["pul_second"] == pytest.approx(50.0)   # (4-1)/4, (6-3)/6
    lo, hi = a["pul_second_ci"]
    assert lo <= 50.0 <= hi


def test_pooled_pul_sums_the_seed_banks():
    from vdu.evaluation import pooled_pul
    ev, data = _Fixed(), UnlearnData(_imgs([0.0]), forget_class=3)
    rows = []
    for n0, n1 in ((4, 1), (6, 0)):           # two banks of 10 samples
        b = measure(ev, _imgs([-0.35] * n0 + [0.25] * (10 - n0)), data)
        a = measure(ev, _imgs([-0.35] * n1 + [0.25] * (10 - n1)), data, before=b)
        rows.append({"before": b, "after": a})
    p = pooled_pul(rows, 3)
    assert p["pul"] == pytest.approx(90.0) and p["n_samples"] == 20 and p["forget_before"] == 10
    assert p["pul_ci"][0] <= 90.0 <= p["pul_ci"][1]
    assert pooled_pul(rows[:1], 3)["pul"] == pytest.approx(rows[0]["after"]["pul"])
    with pytest.raises(ValueError, match="no class 7"):
        pooled_pul(rows, 7)


def test_compare_measures_both_models_on_the_same_noise_per_config():
    from vdu.evaluation import compare, numbers_only
    unet, sched = tiny_unet(), build_scheduler()
    ev, data = _Fixed(), UnlearnData(_imgs([0.0]), forget_class=3)
    cfgs = [EvalConfig(n_samples=6, steps=s, sampler=m, seed=b, bootstrap=50, fid_bootstrap=0)
            for m, s, b in (("ddim", 1, 0), ("dpm", 2, 0), ("ddim", 1, 1))]
    other = __import__("copy").deepcopy(unet)
    with torch.no_grad():                       # another model, a hair away: on the same noise, the same labels
        for p in other.parameters():
            p.add_(1e-7 * torch.randn_like(p))
    rows = compare(unet, other, sched, ev, data, cfgs, second=_Merged())
    assert [(r["sampler"], r["steps"], r["seed_bank"]) for r in rows] == [("ddim", 1, 0), ("dpm", 2, 0), ("ddim", 1, 1)]
    for r in rows:
        assert torch.equal(r["before"]["labels"], r["after"]["labels"])
        assert torch.equal(r["before"]["labels_second"], r["after"]["labels_second"])
        assert not any(torch.is_tensor(v) for v in numbers_only(r["after"]).values())


def test_second_evaluator_architecture_trains_and_refuses_to_overwrite(tmp_path):
    from vdu.evaluator import Evaluator, load_evaluator, train_evaluator
    e = Evaluator(3, 10, 32, width=8, arch="lenet")
    assert e.features(torch.zeros(2, 3, 32, 32)).shape == (2, 32) and e(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="arch must be one of"):
        Evaluator(arch="vit")
    card = train_evaluator("mnist", tmp_path / "e", epochs=1, max_train=2000, seed=1, oe_weight=0, arch="lenet",
                           progress=False)
    assert card["arch"] == "lenet" and card["test_accuracy"] > 0.3      # chance is 0.1
    assert load_evaluator(tmp_path / "e").config["arch"] == "lenet"
    with pytest.raises(FileExistsError, match="already holds an evaluator"):
        train_evaluator("mnist", tmp_path / "e", epochs=1, max_train=64, progress=False)
