"""Canaries (vdu.canaries): the mark detector separates marked from real digits, the two canary sets are a
fixed disjoint pair, and a canary model's training data carries them."""
import pytest
import torch

from conftest import REPO, tiny_train_config
from vdu.canaries import add_mark, canary_sets, evaluate_canaries, has_mark, mark_rate, mark_score


def test_detector_finds_the_mark_and_nothing_on_real_digits(small_data):
    real = small_data.images
    assert mark_rate(real) == 0.0 and float(mark_score(real).max()) < 0.5
    marked = add_mark(real)
    assert mark_rate(marked) == 1.0 and float(mark_score(marked).min()) > 1.5
    faint = add_mark(real, value=-1 + 0.2)                # barely brighter than the margin: not a mark
    assert mark_rate(faint) == 0.0
    assert has_mark(add_mark(torch.full((1, 1, 28, 28), 1.0))).item() is False   # a white image has no contrast


def test_canary_sets_are_a_fixed_disjoint_pair(small_data):
    a, b = canary_sets(small_data, 8)
    a2, _ = canary_sets(small_data, 8)
    assert torch.equal(a.images, a2.images) and len(a) == len(b) == 8
    assert not any(torch.equal(x, y) for x in a.images for y in b.images)
    with pytest.raises(ValueError, match="n must be"):
        canary_sets(small_data, 200)


def test_bad_marks_and_shapes_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        add_mark(torch.zeros(1, 1, 28, 28), size=8, offset=23)
    with pytest.raises(ValueError, match="shape"):
        mark_score(torch.zeros(28, 28))
    with pytest.raises(FloatingPointError):
        mark_rate(torch.full((1, 1, 28, 28), float("nan")))


def test_a_canary_run_refuses_to_resume_with_other_canaries(small_data, tmp_path):
    from vdu.training import ConfigError, pretrain
    cfg = tiny_train_config(tmp_path / "run", steps=2, canaries=4, canary_repeat=4, k_snapshots=0)
    pretrain(cfg, data=small_data, until=2, progress=False)
    with pytest.raises(ValueError, match="canar"):
        pretrain(tiny_train_config(tmp_path / "run", steps=4, canaries=8, canary_repeat=4, k_snapshots=0),
                 data=small_data, progress=False)
    with pytest.raises(ConfigError, match="canaries"):
        tiny_train_config(tmp_path / "x", canaries=-1).check()


def test_evaluate_canaries_scores_marks_and_a_zero_gap_for_identical_sets(small_data, evaluator):
    from conftest import tiny_unet
    from vdu.evaluation import EvalConfig
    from vdu.models import build_scheduler
    real = small_data.images[:16]
    cfg = EvalConfig(n_samples=16, steps=1, nll_timesteps=2)
    samples = torch.cat([add_mark(real[:4]), real[4:]])
    r = evaluate_canaries(tiny_unet(), build_scheduler(), evaluator, cfg, real[:4], real[:4], small_data.images[16:80],
                          samples=samples, bootstrap=50)
    assert r["mark_rate"] == pytest.approx(0.25) and r["membership_gap"] == pytest.approx(0.0, abs=1e-9)
    lo, hi = r["mark_rate_ci"]
    assert lo <= 0.25 <= hi and r["fid"] > 0


def test_a_canary_models_card_reports_its_canaries(small_data, tmp_path, monkeypatch):
    from vdu import cards
    from vdu.training import pretrain
    out = pretrain(tiny_train_config(tmp_path / "run", steps=2, canaries=4, canary_repeat=2, k_snapshots=0),
                   data=small_data, progress=False)
    monkeypatch.setattr(cards, "load_dataset", lambda *a, **k: small_data)     # the test's data, not the full set
    card = cards.model_card(out, REPO / "checkpoints" / "mnist" / "evaluator", n=4, ddim_steps=1, nll_images=2,
                            nll_timesteps=2, progress=False)
    c = card["metrics"]["canaries"]
    assert c["n"] == 4 and c["repeat"] == 2 and 0.0 <= c["mark_rate"] <= 1.0
    assert c["membership_gap"] == pytest.approx(c["nll_trained"] - c["nll_held_out"], abs=2e-4)
