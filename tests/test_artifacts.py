"""The committed MNIST artifacts load and behave (the numbers themselves live in their cards)."""
import json

import pytest
import torch

from conftest import CKPT
from vdu.cards import confident_min_for, quality_bar, wilson
from vdu.metrics import class_histogram
from vdu.models import load_model, null_class
from vdu.posterior import load_posterior
from vdu.diffusion import sample


def test_unconditional_ddpm_generates_recognisable_digits(evaluator):
    unet, sched = load_model(CKPT / "ddpm")
    assert null_class(unet) is None
    x = sample(unet, sched, 40, seed=123, steps=20, progress=False)
    h = class_histogram(evaluator, x)
    assert h["confident_share"] >= 0.5, h["confident_share"]
    assert sum(c > 0 for c in h["counts"]) >= 7, h["counts"]  # not one collapsed mode


def test_conditional_ddpm_follows_its_labels(evaluator):
    unet, sched = load_model(CKPT / "ddpm-cond")
    labels = torch.arange(20) % 10
    x = sample(unet, sched, 20, seed=5, steps=20, class_labels=labels, guidance=1.0, progress=False)
    pred, _ = evaluator.predict(x)
    assert (pred == labels).float().mean() >= 0.5


def test_posterior_matches_the_model_and_is_centred_near_it():
    unet, _ = load_model(CKPT / "ddpm")
    post = load_posterior(CKPT / "ddpm" / "posterior.safetensors", unet)
    assert post["k"] >= 2
    for name, p in unet.named_parameters():
        assert torch.equal(post["deployed"][name], p.detach())
        assert (post["var"][name] > 0).all()
    # EMA weights lie within a few posterior standard deviations of the snapshot mean on average
    z = torch.cat([((post["deployed"][n] - post["mean"][n]) / post["var"][n].sqrt()).flatten() for n in post["mean"]])
    assert z.abs().median() < 10


def test_cards_record_how_the_models_were_made():
    for name in ("ddpm", "ddpm-cond", "ddpm-continued"):
        card = json.loads((CKPT / name / "card.json").read_text())
        assert card["command"].startswith("python -m vdu pretrain") and card["train_steps"] > 0
        assert card["train_wall_s"] > 0 and "quality_bar" in card["metrics"]
        assert (CKPT / name / "samples.png").stat().st_size > 1000
    card = json.loads((CKPT / "ddpm-averaged" / "card.json").read_text())     # a weight average: no training
    assert card["command"].startswith("python -m vdu average")
    assert len(json.loads((CKPT / "ddpm-averaged" / "averaged.json").read_text())["from"]) >= 2
    m, n = card["metrics"], card["metrics"]["samples"]["n"]
    h = {"counts": [round(s * n) for s in m["class_shares"]], "shares": m["class_shares"],
         "confident_share": m["confident_share"], "threshold": 0.9}
    assert m["quality_bar"] == quality_bar(h)                   # the bar it records is the bar of its numbers
    k0, k1 = (round(b["confident_share"] * b["n"]) for b in (m | {"n": n}, card["second_seed_bank"]))
    assert m["confident_share_ci95_wilson"] == wilson(k0, n)
    assert card["second_seed_bank"]["confident_share_ci95_wilson"] == wilson(k1, card["second_seed_bank"]["n"])
    assert card["pooled"]["confident"] == k0 + k1 and card["pooled"]["confident_share_ci95_wilson"] == wilson(
        k0 + k1, card["pooled"]["n"])
    ev = json.loads((CKPT / "evaluator" / "card.json").read_text())
    assert ev["test_accuracy"] >= 0.99


def test_quality_bar_rule():
    h = {"confident_share": 0.93, "shares": [0.1] * 10, "threshold": 0.9}
    assert quality_bar(h)["met"]
    assert not quality_bar({**h, "confident_share": 0.85})["met"]
    assert not quality_bar({**h, "shares": [0.2] + [0.8 / 9] * 9})["met"]


def test_quality_bar_boundary_is_exact():
    """900 of 1,000 confident meets a 90% bar and a class at exactly 15% is inside [5%, 15%]; one fewer
    confident sample, or one more of that class, is not (counted exactly, not through float32 shares)."""
    class Fixed:                      # an evaluator whose labels and confidences are given
        def __init__(self, pred, conf):
            self.pred, self.conf, self.config = pred, conf, {"num_classes": 10}

        def predict(self, images):
            return self.pred, self.conf

    def hist(n_conf, n_zero):
        pred = torch.cat([torch.zeros(n_zero), torch.arange(1000 - n_zero) % 9 + 1]).long()
        conf = torch.cat([torch.full((n_conf,), 0.95), torch.full((1000 - n_conf,), 0.5)])
        return class_histogram(Fixed(pred, conf), torch.zeros(1000, 1, 2, 2))

    assert quality_bar(hist(900, 150))["met"]
    assert not quality_bar(hist(899, 150))["confident_share_ok"]
    assert not quality_bar(hist(900, 151))["class_shares_ok"]


def test_other_datasets_bar_is_half_the_evaluators_share_on_real_images(tmp_path):
    assert confident_min_for("mnist", None)[0] == 0.9
    for ds in ("cifar10", "tinyimagenet"):
        ev = CKPT.parent / ds / "evaluator"
        real = json.loads((ev / "card.json").read_text())["confident_share_test"]
        lo, why = confident_min_for(ds, ev)
        assert lo == real / 2 and f"{real:.1%}" in why
        h = {"confident_share": lo + 0.01, "shares": [0.1] * 10, "threshold": 0.9}
        assert quality_bar(h, lo)["met"] and not quality_bar({**h, "confident_share": lo - 0.01}, lo)["met"]
    with pytest.raises(FileNotFoundError, match="card.json is missing"):
        confident_min_for("cifar10", tmp_path)
    with pytest.raises(ValueError, match="pass the evaluator folder"):
        confident_min_for("cifar10", None)
    (tmp_path / "card.json").write_text(json.dumps({"test_accuracy": 0.7}))
    with pytest.raises(ValueError, match="no confident_share_test"):
        confident_min_for("cifar10", tmp_path)


def test_wilson_interval():
    assert wilson(50, 100) == [0.4038, 0.5962]          # the textbook value
    assert wilson(0, 100)[0] == 0 and wilson(100, 100)[1] == 1
    for k, n in ((5, 4), (-1, 4), (1.5, 4), (0, 0)):
        with pytest.raises(ValueError, match="whole counts"):
            wilson(k, n)
    lo, hi = wilson(841, 1000)
    assert lo < 0.841 < hi and hi - lo < 0.05


def test_second_evaluator_is_accurate_and_independent_of_the_first(evaluator, mnist_test):
    from vdu.evaluator import load_evaluator
    second = load_evaluator(CKPT / "evaluator-lenet")
    card = json.loads((CKPT / "evaluator-lenet" / "card.json").read_text())
    assert second.config["arch"] != evaluator.config.get("arch", "cnn") and card["outlier_exposure_weight"] == 0
    x, y = mnist_test.images[:1000], mnist_test.labels[:1000]
    p1, _ = evaluator.predict(x)
    p2, _ = second.predict(x)
    assert (p2 == y).float().mean() >= 0.98 and (p1 == p2).float().mean() >= 0.97


@pytest.mark.parametrize("ds", ["cifar10", "tinyimagenet"])
def test_other_datasets_base_models_sample_and_record_how_they_were_made(ds):
    folder = CKPT.parent / ds / "ddpm"
    card = json.loads((folder / "card.json").read_text())
    assert card["command"].startswith(f"python -m vdu pretrain --dataset {ds}")
    first = card["init"]["command"] if "--init" in card["command"] else card["command"]   # a continuation: its init's
    assert first.startswith(f"python -m vdu pretrain --dataset {ds}") and "--model-overrides" in first
    assert card["train_steps"] > 0 and card["train_wall_s"] > 0 and card["card_machine"].startswith("CPU")
    bar = card["metrics"]["quality_bar"]
    assert bar["confident_min"] == pytest.approx(confident_min_for(ds, CKPT.parent / ds / "evaluator")[0], abs=1e-4)
    assert card["metrics"]["bits_per_dim"]["mean"] < 6      # far below uniform noise (8 bits/dim): a trained model
    assert (folder / "samples.png").stat().st_size > 1000
    unet, sched = load_model(folder)
    x = sample(unet, sched, 2, seed=0, steps=3, progress=False)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
