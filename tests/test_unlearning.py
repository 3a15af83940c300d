"""The shared entry point ``vdu.unlearning.unlearn``: guards, stop rule, saving, errors, and a smoke
run on the committed MNIST DDPM where the forget-class share falls without collapse."""
import os
import warnings
from pathlib import Path

import pytest
import torch

from conftest import CKPT, TINY, tiny_unet
from vdu.models import build_scheduler, build_unet, load_model
from vdu.posterior import save_posterior
from vdu.data import UnlearnData
from vdu.unlearning import LoopConfig, unlearn

FAST = dict(progress=False, probe_size=8, batch_size=8, probe_every=0)


def _post(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    dep = {n: p.detach().clone() for n, p in unet.named_parameters()}
    mean = {n: v + 1e-3 * torch.randn(v.shape, generator=g) for n, v in dep.items()}
    var = {n: torch.full_like(v, 1e-4) for n, v in dep.items()}
    return {"mean": mean, "var": var, "deployed": dep, "k": 2, "method": "test"}


@pytest.fixture(scope="module")
def tiny():
    return tiny_unet(), build_scheduler(), (torch.rand(16, 1, 28, 28) * 2 - 1)


def _weights(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_divergence_guard_restores_good_weights(tiny):
    unet, sched, x = tiny
    before = _weights(unet)
    with pytest.warns(RuntimeWarning, match="divergence guard"):
        out = unlearn(unet, x, "neggrad", sched, steps=5, lr=1e6, grad_clip=None, **FAST)
    log = out.unlearn_log
    assert log.stop_reason == "diverged" and "divergence guard" in log.events[0]
    w = _weights(out)
    assert torch.isfinite(w).all()
    assert torch.equal(w, before) if log.steps_done == 0 else True  # weights of the last sane step
    assert torch.equal(_weights(unet), before)  # not in place by default


def test_gamma_one_pins_weights_at_deployed(tiny):
    unet, sched, x = tiny
    out = unlearn(unet, x, "vdu", sched, posterior=_post(unet), gamma=1.0, center="deployed", steps=3,
                  **{**FAST, "batch_size": 4})
    assert torch.equal(_weights(out), _weights(unet))
    assert [s["B"] for s in out.unlearn_log.steps] == [0.0, 0.0, 0.0]
    assert len(out.unlearn_log.steps) == 3 and {"A", "B", "loss", "forget_loss"} <= set(out.unlearn_log.steps[0])


def test_stop_rule_fires_on_forget_loss(tiny):
    unet, sched, x = tiny
    out = unlearn(unet, x, "vdu", sched, posterior=_post(unet), gamma=0.0, lr=1e-2, steps=40,
                  stop_forget_ratio=1.5, **{**FAST, "probe_every": 2})
    log = out.unlearn_log
    assert log.stop_reason == "stop_rule", log.probes
    assert log.probes[-1]["forget_loss"] >= 1.5 * log.probes[0]["forget_loss"]
    assert log.steps_done < 40 and log.steps_done % 2 == 0


def test_save_and_reload(tiny, tmp_path):
    unet, sched, x = tiny
    out = unlearn(unet, x, "neggrad", sched, steps=2, save_to=str(tmp_path / "m"), **FAST)
    re, _ = load_model(tmp_path / "m")
    # stored as float16 (vdu.models.save_model), computed in float32
    assert torch.allclose(_weights(re), _weights(out), rtol=1e-3, atol=1e-4)
    assert not torch.allclose(_weights(re), _weights(unet), rtol=1e-3, atol=1e-4)
    assert (tmp_path / "m" / "unlearn.json").exists()


def test_bad_inputs(tiny, tmp_path):
    unet, sched, x = tiny
    post = _post(unet)
    with pytest.raises(ValueError, match="empty"):
        unlearn(unet, x[:0], "vdu", sched, posterior=post, **FAST)
    for g in (-0.1, 1.01):
        with pytest.raises(ValueError, match="gamma"):
            unlearn(unet, x, "vdu", sched, posterior=post, gamma=g, **FAST)
    with pytest.raises(ValueError, match="do not match the model"):
        unlearn(unet, torch.zeros(4, 3, 32, 32), "vdu", sched, posterior=post, **FAST)
    with pytest.raises(ValueError, match="posterior"):
        unlearn(unet, x, "vdu", sched, posterior=None, **FAST)
    with pytest.raises(ValueError, match="unknown unlearning method 'fisher'.*known methods"):
        unlearn(unet, x, "fisher", sched, **FAST)
    with pytest.raises(TypeError, match="unknown unlearn option 'gama'"):
        unlearn(unet, x, "neggrad", sched, gama=0.5, **FAST)
    with pytest.raises(TypeError, match=r"'gamma' belongs to method\(s\) \['vdu'\], not to 'neggrad'"):
        unlearn(unet, x, "neggrad", sched, gamma=0.5, **FAST)
    with pytest.raises(ValueError, match="needs retain data"):
        unlearn(unet, x, "finetune", sched, **FAST)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        unlearn(unet, UnlearnData(x, forget_class=1), "esd", sched, **FAST)
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        unlearn(unet, (x * 127.5 + 127.5).to(torch.uint8), "neggrad", sched, **FAST)
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
        unlearn(unet, x * 127.5 + 127.5, "neggrad", sched, **FAST)
    for bad in (dict(batch_size=0), dict(steps=-1), dict(lr=0.0), dict(steps=2.5)):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            unlearn(unet, x, "neggrad", sched, **{**FAST, **bad})
    # a posterior file made for a different architecture
    other = build_unet("mnist", **{**TINY, "block_out_channels": (16, 32)})
    p = _post(other)
    path = save_posterior(tmp_path / "other.safetensors", p["mean"], p["var"], p["deployed"], 2, "test")
    with pytest.raises(ValueError, match="different architecture"):
        unlearn(unet, x, "vdu", sched, posterior=path, **FAST)


def test_config_object_and_overrides(tiny):
    unet, sched, x = tiny
    cfg = LoopConfig(steps=1, **FAST)
    out = unlearn(unet, x, "neggrad", sched, config=cfg, lr=1e-5)
    assert out.unlearn_log.config["lr"] == 1e-5 and cfg.lr == 1e-4  # the caller's config is not mutated


MODEL = Path(os.environ.get("VDU_TEST_MODEL", CKPT / "ddpm"))


def test_function_space_kl_is_zero_at_the_teacher_and_pulls_back(tiny):
    from vdu.methods.vdu import function_space_kl
    unet, sched, x = tiny
    student = tiny_unet()
    g = torch.Generator().manual_seed(0)
    assert function_space_kl(student, unet, sched, x, generator=g).item() == 0.0
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    kl = function_space_kl(student, unet, sched, x, generator=torch.Generator().manual_seed(0))
    assert kl.item() > 0
    kl.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    for p in unet.parameters():
        assert p.grad is None                      # the teacher is never trained


def test_function_stability_holds_the_model_where_neggrad_runs_away(tiny):
    """gamma = 1 with stability='function' keeps the model at the teacher (KL = 0, zero gradient);
    gamma = 0.9 drifts far less than gamma = 0 (NegGrad) with the same steps."""
    unet, sched, x = tiny
    kw = dict(stability="function", replay_samples=8, replay_ddim_steps=2, steps=6, lr=1e-3, **FAST)
    pinned = unlearn(unet, x, "vdu", sched, gamma=1.0, **kw)
    assert torch.allclose(_weights(pinned), _weights(unet)) and pinned.unlearn_log.steps[0]["B"] == 0.0
    drift = {g: (_weights(unlearn(unet, x, "vdu", sched, gamma=g, **kw)) - _weights(unet)).norm().item()
             for g in (0.0, 0.9)}
    assert 0 < drift[0.9] < drift[0.0], drift


def test_sgd_and_preconditioning(tiny):
    unet, sched, x = tiny
    post = _post(unet)
    # sigma*^2 twice as large on conv_in: with precondition the SGD step there is twice the plain one
    post["var"] = {n: torch.full_like(v, 2e-4 if n == "conv_in.weight" else 1e-4) for n, v in post["var"].items()}
    kw = dict(posterior=post, gamma=0.0, optimizer="sgd", lr=1e-3, grad_clip=None, steps=1, **FAST)
    plain = unlearn(unet, x, "vdu", sched, **kw)
    pre = unlearn(unet, x, "vdu", sched, precondition=True, **kw)
    d = {n: p for n, p in unet.named_parameters()}
    step_plain = {n: (p - d[n]).detach() for n, p in plain.named_parameters()}
    step_pre = {n: (p - d[n]).detach() for n, p in pre.named_parameters()}
    mean_var = sum(v.sum() for v in post["var"].values()) / sum(v.numel() for v in post["var"].values())
    for n in ("conv_in.weight", "conv_out.weight"):
        assert torch.allclose(step_pre[n], step_plain[n] * post["var"][n] / mean_var, rtol=1e-2, atol=1e-9), n
    with pytest.raises(ValueError, match="optimizer"):
        unlearn(unet, x, "vdu", sched, posterior=post, optimizer="lbfgs", **FAST)
    with pytest.raises(TypeError, match="precondition"):
        unlearn(unet, x, "neggrad", sched, precondition=True, **FAST)
    with pytest.raises(ValueError, match="precondition"):
        unlearn(unet, x, "vdu", sched, stability="function", precondition=True, **FAST)
    with pytest.raises(ValueError, match="stability"):
        unlearn(unet, x, "vdu", sched, posterior=post, stability="fisher", **FAST)


# --- smoke runs on the committed MNIST DDPM: unlearning vs collapse, told apart -------------------

@pytest.fixture(scope="module")
def mnist_setup(evaluator, mnist_test):
    if not (MODEL / "posterior.safetensors").exists():
        pytest.skip(f"no model + posterior at {MODEL}")
    torch.manual_seed(0)
    unet, sched = load_model(MODEL)
    forget, retain = mnist_test.split(1)
    return unet, sched, forget.images[:128], retain.take(500, seed=0).images


SMOKE_EVAL = dict(eval_samples=128, eval_ddim_steps=20, eval_seed=0, progress=False)


def _smoke(mnist_setup, evaluator, **cfg):
    unet, sched, forget, ref = mnist_setup
    out = unlearn(unet, UnlearnData(forget, forget_class=1, reference=ref), "vdu", sched,
                  posterior=MODEL / "posterior.safetensors", evaluator=evaluator, batch_size=32, probe_every=0,
                  **SMOKE_EVAL, **cfg)
    return out.unlearn_log.evals[0], out.unlearn_log.evals[-1], out.unlearn_log


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [
    dict(stability="posterior", gamma=0.5, lr=1e-6, steps=20, eval_every=20),
    dict(stability="function", gamma=0.9, lr=1e-4, steps=20, eval_every=20, replay_samples=64,
         replay_ddim_steps=10),
], ids=["posterior", "function"])
def test_smoke_forget_share_falls_without_collapse(mnist_setup, evaluator, cfg):
    """Class 1 (the paper's MNIST example), 128 seed-bank samples: the class-1 share falls (PUL > 0)
    while the confident share and u-FID stay near the pretrained model's (not a collapse)."""
    first, last, _ = _smoke(mnist_setup, evaluator, **cfg)
    assert first["forget_share"] > 0.05
    assert last["pul"] > 25 and last["forget_share"] < first["forget_share"]
    assert last["confident_share"] >= 0.8 * first["confident_share"], (first, last)
    assert last["u_fid"] <= 1.5 * first["u_fid"], (first, last)


@pytest.mark.slow
def test_smoke_collapse_is_caught_not_counted(mnist_setup, evaluator):
    """The measured hazard of docs/mathematics.md §1: at lr 1e-4 the paper's objective blanks the samples within
    a few steps. The forget share then 'falls' too, but the confident share and u-FID expose it, and the
    collapse guard stops the run and restores the last healthy weights."""
    unet = mnist_setup[0]
    with pytest.warns(RuntimeWarning, match="collapse guard"):
        first, last, log = _smoke(mnist_setup, evaluator, stability="posterior", gamma=0.5, lr=1e-4, steps=10,
                                  eval_every=5, collapse_confident_min=0.25)
    assert log.stop_reason == "collapse"
    assert last["confident_share"] < 0.25 and last["u_fid"] > 2 * first["u_fid"]
    # what is returned is the model of the last healthy evaluation, not the collapsed one
    assert log.steps_done < log.evals[-1]["step"]


def test_bounded_plasticity_fixes_the_forget_gradient_norm(tiny):
    """plasticity_norm: A's gradient is rescaled to that norm every step, so with gamma = 0 the step's
    gradient norm is exactly the chosen value whatever the loss scale."""
    unet, sched, x = tiny
    for norm in (0.5, 2.0):
        out = unlearn(unet, x, "vdu", sched, posterior=_post(unet), gamma=0.0, plasticity_norm=norm, steps=2,
                      grad_clip=None, **FAST)
        assert [s["grad_norm"] for s in out.unlearn_log.steps] == pytest.approx([norm, norm], rel=1e-4)
    with pytest.raises(ValueError, match="plasticity_norm"):
        unlearn(unet, x, "vdu", sched, posterior=_post(unet), plasticity_norm=0.0, **FAST)


def test_the_last_step_is_checked_too(tiny):
    """Four SGD steps of NegGrad at a huge rate blow the forget loss up on the last step; with no probe in
    between, the run must still say 'diverged' and return the weights before that step, not 'max_steps'."""
    unet, sched, x = tiny
    with pytest.warns(RuntimeWarning, match="after the last step"):
        out = unlearn(unet, x, "neggrad", sched, optimizer="sgd", lr=1e3, grad_clip=None, steps=1, **FAST)
    assert out.unlearn_log.stop_reason == "diverged" and out.unlearn_log.steps_done == 0
    assert torch.equal(_weights(out), _weights(unet))


def test_notebook_configs_are_checked_before_any_work():
    from vdu.notebook import check_options
    check_options({"a": dict(gamma=0.5, lr=1e-5, stop_forget_ratio=1.3)}, "vdu")
    with pytest.raises(ValueError, match="config 'b'.*unknown unlearn option 'gama'"):
        check_options({"a": dict(gamma=0.5), "b": dict(gama=0.5)}, "vdu")


def test_divergence_restores_and_reports_the_last_sane_step(tiny):
    """Steps are counted as the weights are: after a divergence at the k-th loss, the weights returned are those
    after k - 2 steps (the last ones whose loss was seen sane), and steps_done says so."""
    unet, sched, x = tiny
    seen = {}

    def spy(step, model, log):
        seen[step] = _weights(model).clone()
    with pytest.warns(RuntimeWarning, match="divergence guard"):
        out = unlearn(unet, x, "neggrad", sched, steps=50, lr=1e6, grad_clip=None, callback=spy, **FAST)
    log = out.unlearn_log
    assert log.stop_reason == "diverged"
    k = log.steps_done
    assert torch.equal(_weights(out), seen[k] if k else _weights(unet))
    assert f"weights of step {k}" in log.events[0]


def test_non_finite_monitoring_samples_count_as_divergence(tiny, evaluator, monkeypatch):
    """When the monitoring's samples are non-finite (the sampler refuses them, they are never scored as
    'forgetting'), the run stops as diverged with the weights of the last evaluation that passed."""
    import vdu.unlearning
    unet, sched, x = tiny
    real, calls = vdu.unlearning.evaluate, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:                          # the evaluation after step 2
            raise FloatingPointError("the model produced non-finite samples")
        return real(*a, **k)
    monkeypatch.setattr(vdu.unlearning, "evaluate", flaky)
    with pytest.warns(RuntimeWarning, match="monitoring at step 2"):
        out = unlearn(unet, UnlearnData(x, forget_class=1), "neggrad", sched, evaluator=evaluator, eval_every=1,
                      eval_samples=4, eval_ddim_steps=2, steps=6, lr=1e-5, **FAST)
    log = out.unlearn_log
    assert log.stop_reason == "diverged" and log.steps_done == 1 and [e["step"] for e in log.evals] == [0, 1]
