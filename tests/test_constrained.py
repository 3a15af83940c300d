"""Constrained unlearning in the engine (docs/mathematics.md §2): the dual ascent, RU on a class-conditional
UNet, and VDU's likelihood-constrained gamma — multipliers move the right way, reach the closed form
where it is known, and an unreachable threshold stops the run as infeasible instead of looping."""
import numpy as np
import pytest
import torch

from conftest import tiny_unet
from test_methods import LOOP, SMALL, _data
from vdu.models import build_scheduler
from vdu.primal_dual import DualAscent, DualDomain, InfeasibleConstraint
from vdu.unlearning import unlearn


def test_dual_ascent_averages_the_window_and_projects():
    d = DualAscent(DualDomain("ru", 1, margin=0.1), lr=0.5, every=2)
    d.observe([0.2])
    assert d.step(1) is None                       # not a dual step
    d.observe([0.6])
    rec = d.step(2)
    assert rec["violations"] == pytest.approx([0.4]) and d.lam == pytest.approx([0.2])
    d.observe([10.0]), d.observe([10.0])
    d.step(4)
    assert d.lam == pytest.approx([0.9])           # projected onto lambda <= 1 - margin
    d.observe([-10.0]), d.observe([-10.0])
    d.step(6)
    assert d.lam == pytest.approx([0.0])           # and onto lambda >= 0


def test_dual_ascent_reports_a_runaway_multiplier():
    d = DualAscent(DualDomain("lu", 1, cap=[1.0]), lr=1.0, patience=3)
    with pytest.raises(InfeasibleConstraint, match="pinned") as e:
        for s in range(1, 10):
            d.observe([5.0])
            d.step(s)
    assert s == 3 and e.value.lam == pytest.approx([1.0])   # at the cap from the first step: three pinned steps


def test_dual_ascent_rejects_bad_settings():
    with pytest.raises(ValueError, match=">= 1"):
        DualAscent(DualDomain("lu", 1), every=0)
    with pytest.raises(ValueError, match="learning rates"):
        DualAscent(DualDomain("lu", 1), lr=-1.0)
    d = DualAscent(DualDomain("lu", 2))
    with pytest.raises(ValueError, match="2 multipliers"):
        d.observe([1.0])
    with pytest.raises(ValueError, match="no violations"):
        d.step(1)


def test_ru_multiplier_rises_while_the_prompt_is_too_close_to_the_concept():
    """kl_min > 1: at alpha = 0 the target is the unconditional branch, whose KL is ~D0 < kl_min D0,
    so the constraint is violated and lambda (the guidance alpha) must grow."""
    unet, sched = tiny_unet(conditional=True), build_scheduler()
    out = unlearn(unet, _data(), "ru", sched, **{**LOOP, "steps": 6}, kl_min=4.0, lam0=0.0, dual_every=2, dual_lr=0.1,
                  sample_steps=2)
    duals = out.unlearn_log.duals
    assert [d["step"] for d in duals] == [2, 4, 6]
    lam = [d["lam"][0] for d in duals]
    assert all(b > a for a, b in zip([0.0] + lam, lam)), lam
    assert all(v > 0 for d in duals for v in d["violations"])
    assert all(d["violations"][0] == pytest.approx(4.0 - d["kl"][0]) for d in duals)
    assert duals[-1]["alpha"][0] == pytest.approx(lam[-1] / (1 - lam[-1]))


def test_ru_starts_at_the_closed_form_guidance():
    """Without lam0 the multiplier starts where a perfectly fitted model meets the threshold:
    (1 + alpha)^2 = kl_min, i.e. ESD's eta = 1 for kl_min = 4."""
    unet, sched = tiny_unet(conditional=True), build_scheduler()
    out = unlearn(unet, _data(), "ru", sched, **{**LOOP, "steps": 1}, kl_min=4.0, dual_lr=0.0, sample_steps=2)
    assert out.unlearn_log.steps[0]["alpha_1"] == pytest.approx(1.0)


def test_ru_erases_two_prompts_with_one_multiplier_each():
    unet, sched = tiny_unet(conditional=True), build_scheduler()
    out = unlearn(unet, _data(), "ru", sched, **{**LOOP, "steps": 2}, concepts=(1, 3), dual_every=1,
                  sample_steps=2)
    d = out.unlearn_log.duals[-1]
    assert d["concepts"] == [1, 3] and len(d["lam"]) == 2 and len(d["violations"]) == 2
    assert {"alpha_1", "alpha_3"} <= set(out.unlearn_log.steps[-1]) and len(d["kl"]) == 2


def test_ru_unreachable_threshold_stops_as_infeasible():
    unet, sched = tiny_unet(conditional=True), build_scheduler()
    with pytest.warns(RuntimeWarning, match="infeasible"):
        out = unlearn(unet, _data(), "ru", sched, **{**LOOP, "steps": 200, "lr": 1e-4, "probe_every": 0},
                      kl_min=1e6, alpha_max=0.5, dual_lr=10.0, dual_every=1, patience=3, sample_steps=2)
    log = out.unlearn_log
    assert log.stop_reason == "infeasible" and log.steps_done < 10
    assert log.duals[-1]["lam"][0] == pytest.approx(0.5 / 1.5)
    assert "concept 1" in log.events[-1]


@pytest.mark.parametrize("bad", [dict(concepts=(1, 1)), dict(concepts=(12,)), dict(alpha_max=0.0),
                                 dict(lam0=0.99), dict(dual_every=0), dict(kl_min=-1.0)])
def test_ru_refuses_bad_settings(bad):
    unet, sched = tiny_unet(conditional=True), build_scheduler()
    with pytest.raises(ValueError):
        unlearn(unet, _data(), "ru", sched, **{**LOOP, "steps": 1}, sample_steps=2, **bad)


def test_ru_alpha_zero_matches_esd_eta_zero():
    """At lambda = 0 RU's primal step is ESD's with eta = 0 (same x_t, same target): same weights."""
    sched = build_scheduler()
    kw = {**LOOP, "steps": 1, "probe_every": 0}
    a = unlearn(tiny_unet(conditional=True), _data(), "esd", sched, **kw, eta=0.0, sample_steps=2)
    b = unlearn(tiny_unet(conditional=True), _data(), "ru", sched, **kw, lam0=0.0, dual_lr=0.0, sample_steps=2)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_vdu_dual_gamma_falls_while_the_forget_loss_is_below_its_target():
    """forget_ratio 2: the pretrained forget loss is ~1x its target's half, the constraint is violated,
    so the multiplier grows and gamma = 1 / (1 + lambda) falls below its start."""
    unet, sched = tiny_unet(), build_scheduler()
    out = unlearn(unet, _data(), "vdu", sched, **{**LOOP, "steps": 4}, **SMALL["vdu"], gamma=0.8, forget_ratio=2.0,
                  dual_every=2, dual_lr=0.5)
    duals = out.unlearn_log.duals
    assert [d["step"] for d in duals] == [2, 4]
    g = [d["gamma"] for d in duals]
    assert 0.8 > g[0] > g[1], g
    assert out.unlearn_log.steps[0]["gamma"] == pytest.approx(0.8)


def test_vdu_dual_gamma_rises_once_the_constraint_holds():
    """forget_ratio 0.5 is met at the start: lambda falls to 0 and gamma to 1 (pure stability)."""
    unet, sched = tiny_unet(), build_scheduler()
    out = unlearn(unet, _data(), "vdu", sched, **{**LOOP, "steps": 4}, **SMALL["vdu"], gamma=0.5, forget_ratio=0.5,
                  dual_every=1, dual_lr=2.0)
    assert out.unlearn_log.duals[-1]["gamma"] == pytest.approx(1.0)


def test_vdu_dual_unreachable_forget_ratio_is_infeasible():
    unet, sched = tiny_unet(), build_scheduler()
    with pytest.warns(RuntimeWarning, match="infeasible"):
        out = unlearn(unet, _data(), "vdu", sched, **{**LOOP, "steps": 100, "lr": 1e-6, "probe_every": 0},
                      **SMALL["vdu"], forget_ratio=1e4, gamma_min=0.5, dual_every=1, dual_patience=3)
    assert out.unlearn_log.stop_reason == "infeasible"
    assert np.isclose(out.unlearn_log.duals[-1]["lam"][0], 1.0)


@pytest.mark.parametrize("bad", [dict(forget_ratio=0.0), dict(forget_ratio=float("inf")), dict(gamma_min=0.0),
                                 dict(gamma_min=0.9), dict(dual_every=0), dict(dual_lr=-1.0)])
def test_vdu_dual_refuses_bad_settings(bad):
    unet, sched = tiny_unet(), build_scheduler()
    with pytest.raises(ValueError):
        unlearn(unet, _data(), "vdu", sched, **{**LOOP, "steps": 1}, **SMALL["vdu"],
                **{"forget_ratio": 1.5, **bad})


# --- FU: forward-KL constrained data unlearning --------------------------------------------------------

def test_fu_multiplier_stops_at_retraining_and_reports_a_threshold_beyond_it():
    """forget_ratio 1e3 is more than retraining (lambda = w) can give: lambda runs to w and the run stops as
    infeasible; the multipliers never leave FU's dual domain [0, w]."""
    unet, sched = tiny_unet(), build_scheduler()
    with pytest.warns(RuntimeWarning, match="infeasible"):
        out = unlearn(unet, _data(), "fu", sched, **{**LOOP, "steps": 100, "probe_every": 0}, forget_ratio=1e3,
                      forget_mass=0.1, groups=2, dual_lr=1.0, dual_every=1, patience=3)
    log = out.unlearn_log
    assert log.stop_reason == "infeasible" and log.steps_done < 10
    lam = np.array(log.duals[-1]["lam"])
    assert np.allclose(lam, 0.05) and "dual domain" in log.events[-1]


def test_fu_loss_is_the_lagrangian_with_forget_weight_w_minus_lambda():
    """At lambda = 0 the forget term carries weight w / (1 - w) (the pretrained mixture); at lambda = w none
    (retraining without the forget data)."""
    from vdu.methods import Batch, get_method
    unet, sched = tiny_unet(), build_scheduler()
    d = _data()
    cls = get_method("fu")
    m = cls(unet, d, cls.Config(forget_mass=0.2), sched, None)
    b = lambda: Batch(d.forget[:4], None, d.retain[:4], None, torch.Generator().manual_seed(0), 8, torch.arange(4))
    out0 = m.loss(unet, b())
    assert float(out0["loss"].detach()) == pytest.approx(float(out0["retain_loss"]) + 0.25 * float(out0["forget_loss"]), rel=1e-5)
    m.dual.lam[:] = 0.2
    out1 = m.loss(unet, b())
    assert float(out1["loss"].detach()) == pytest.approx(float(out1["retain_loss"]), rel=1e-6)


def test_fu_groups_track_their_own_images():
    unet, sched = tiny_unet(), build_scheduler()
    out = unlearn(unet, _data(), "fu", sched, **{**LOOP, "steps": 2, "batch_size": 8}, groups=8, dual_every=2)
    d = out.unlearn_log.duals[-1]
    assert len(d["lam"]) == 8 and all(r is not None and r > 0 for r in d["ratio"])


@pytest.mark.parametrize("bad", [dict(forget_mass=1.0), dict(groups=0), dict(groups=100), dict(lam_max=-1.0),
                                 dict(forget_ratio=0.0)])
def test_fu_refuses_bad_settings(bad):
    with pytest.raises(ValueError):
        unlearn(tiny_unet(), _data(), "fu", build_scheduler(), **{**LOOP, "steps": 1}, **bad)


def test_a_fixed_multiplier_at_the_boundary_is_not_reported_infeasible():
    """FU held at a fixed lambda beyond its dual domain (NegGrad + retain): dual lr 0 never 'runs away'."""
    unet, sched = tiny_unet(), build_scheduler()
    out = unlearn(unet, _data(), "fu", sched, **{**LOOP, "steps": 8, "probe_every": 0}, forget_ratio=1e3,
                  lam_max=3.0, lam0=3.0, dual_lr=0.0, dual_every=1, patience=2)
    log = out.unlearn_log
    assert log.stop_reason == "max_steps" and log.steps_done == 8
    assert np.allclose(log.duals[-1]["lam_over_w"], 3.0)


def test_fu_without_lam0_starts_at_zero_or_at_the_fixed_weight():
    unet, sched = tiny_unet(), build_scheduler()
    kw = dict(**{**LOOP, "steps": 2, "probe_every": 0}, forget_ratio=1.0, lam_max=3.0, dual_every=1)
    fixed = unlearn(unet, _data(), "fu", sched, **kw, dual_lr=0.0).unlearn_log.duals[-1]["lam_over_w"]
    assert np.allclose(fixed, 3.0)                       # dual lr 0: a fixed weight, at lam_max
    ascent = unlearn(unet, _data(), "fu", sched, **kw, dual_lr=1e-9).unlearn_log.duals[0]["lam_over_w"]
    assert np.allclose(ascent, 0.0, atol=1e-6)            # dual ascent starts at lambda 0 (no push yet)


def _sure_classifier(tmp_path, k, sure=True):
    """A classifier that gives class k probability ~1 (sure) or ~0 (not sure) on every image."""
    from vdu.evaluator import Evaluator, save_evaluator
    clf = Evaluator(width=4, arch="lenet")
    lin = clf.head[1]
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.fill_(0.0)
        lin.bias[k] = 30.0 if sure else -30.0
    return str(save_evaluator(clf, tmp_path / f"clf-{k}-{sure}"))


@pytest.mark.parametrize("sure", [True, False])
def test_lu_is_negative_guidance_scaled_by_the_concept_weight(tmp_path, sure):
    """LU's target is eps_null + lambda w (eps_null - eps_c): where the classifier is sure of the concept
    (w = 1) its step is ESD's with eta = lambda; where it is sure the sample is not the concept (w = 0) the
    step is ESD's with eta = 0, whatever lambda is."""
    sched = build_scheduler()
    kw = {**LOOP, "steps": 2, "probe_every": 0}
    a = unlearn(tiny_unet(conditional=True), _data(), "esd", sched, **kw, eta=2.5 if sure else 0.0, sample_steps=2)
    b = unlearn(tiny_unet(conditional=True), _data(), "lu", sched, **kw, lam0=2.5, dual_lr=0.0, sample_steps=2,
                dual_samples=2, classifier=_sure_classifier(tmp_path, 1, sure))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    w = [s["w_1"] for s in b.unlearn_log.steps]
    assert all(v == pytest.approx(1.0 if sure else 0.0, abs=1e-6) for v in w)


def test_lu_multiplier_follows_the_measured_concept_rate(tmp_path):
    """The dual step measures E_p[w_c] on full samples: a rate above eps raises lambda by dual_lr x violation;
    a rate of 0 lowers it to the boundary lambda = 0."""
    sched = build_scheduler()
    kw = {**LOOP, "steps": 4, "probe_every": 0}
    up = unlearn(tiny_unet(conditional=True), _data(), "lu", sched, **kw, eps=0.1, lam0=1.0, dual_lr=0.5,
                 dual_every=2, sample_steps=2, dual_samples=3, classifier=_sure_classifier(tmp_path, 1, True))
    d = up.unlearn_log.duals
    assert [r["step"] for r in d] == [2, 4]
    assert d[0]["rate"][0] == pytest.approx(1.0, abs=1e-6) and d[0]["violations"][0] == pytest.approx(0.9, abs=1e-6)
    assert [r["lam"][0] for r in d] == pytest.approx([1.45, 1.9], abs=1e-5)
    down = unlearn(tiny_unet(conditional=True), _data(), "lu", sched, **kw, eps=0.1, lam0=0.02, dual_lr=0.5,
                   dual_every=2, sample_steps=2, dual_samples=3, classifier=_sure_classifier(tmp_path, 1, False))
    assert [r["lam"][0] for r in down.unlearn_log.duals] == [0.0, 0.0]


def test_lu_unreachable_threshold_stops_as_infeasible(tmp_path):
    """A prompt the classifier always calls the concept can never meet eps: lambda climbs to lam_max, sits
    there with the constraint violated, and the run stops as infeasible."""
    unet, sched = tiny_unet(conditional=True), build_scheduler()
    with pytest.warns(RuntimeWarning, match="infeasible"):
        out = unlearn(unet, _data(), "lu", sched, **{**LOOP, "steps": 200, "lr": 1e-4, "probe_every": 0},
                      eps=0.0, lam_max=2.0, dual_lr=10.0, dual_every=1, patience=3, sample_steps=2, dual_samples=2,
                      classifier=_sure_classifier(tmp_path, 1, True))
    log = out.unlearn_log
    assert log.stop_reason == "infeasible" and log.steps_done < 10
    assert log.duals[-1]["lam"][0] == pytest.approx(2.0)
    assert "concept 1" in log.events[-1]


@pytest.mark.parametrize("bad", [dict(classifier=None), dict(eps=1.5), dict(lam0=-1.0), dict(lam_max=0.0),
                                 dict(dual_samples=0), dict(concepts=(1, 1))])
def test_lu_refuses_bad_settings(tmp_path, bad):
    unet, sched = tiny_unet(conditional=True), build_scheduler()
    opts = {"classifier": _sure_classifier(tmp_path, 1), "sample_steps": 2, **bad}
    with pytest.raises(ValueError):
        unlearn(unet, _data(), "lu", sched, **{**LOOP, "steps": 1}, **opts)


def test_lu_refuses_a_classifier_of_other_images(tmp_path):
    from vdu.evaluator import Evaluator, save_evaluator
    rgb = str(save_evaluator(Evaluator(in_channels=3, image_size=32, width=4, arch="lenet"), tmp_path / "rgb"))
    with pytest.raises(ValueError, match="classifier takes 3 x 32 px"):
        unlearn(tiny_unet(conditional=True), _data(), "lu", build_scheduler(), **{**LOOP, "steps": 1},
                classifier=rgb, sample_steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [
    ("ru", dict(kl_min=2.25, dual_lr=0.01, dual_every=10, sample_steps=10)),
    ("lu", dict(eps=0.05, dual_lr=4.0, dual_every=10, sample_steps=10, dual_samples=16)),
], ids=["ru", "lu"])
def test_smoke_constrained_concept_unlearning_erases_the_prompt(evaluator, mnist_test, method, options):
    """On the committed class-conditional DDPM, 30 steps of RU or LU on prompt 1 lower the share of 1s among its
    samples (judged by the evaluator; LU is weighted by the independent second evaluator) while another prompt
    still yields its digit in most of its samples."""
    from conftest import CKPT
    from vdu.data import UnlearnData
    from vdu.models import load_model
    from vdu.diffusion import sample
    unet, sched = load_model(CKPT / "ddpm-cond")
    if method == "lu":
        options = {**options, "classifier": str(CKPT / "evaluator-lenet")}
    ones = UnlearnData(mnist_test.images[mnist_test.labels == 1][:32], forget_class=1)

    def share(model, k):
        x = sample(model, sched, 48, seed=3, steps=10, class_labels=torch.full((48,), k), progress=False)
        return float((evaluator.predict(x)[0] == k).float().mean())

    out = unlearn(unet, ones, method, sched, steps=30, batch_size=16, lr=2e-5, probe_every=0, progress=False,
                  **options)
    before, after = share(unet, 1), share(out, 1)
    assert before > 0.7 and after < before - 0.3, (before, after)
    # not a collapse: another prompt still yields its digit (retention at this budget is measured, not met:
    # the constrained_unlearning notebook reports the drop)
    assert share(out, 7) >= 0.5, share(out, 7)
    assert out.unlearn_log.duals, "the multiplier was never updated"
