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
from vdu.unlearning import UnlearnConfig, unlearn

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
    with pytest.raises(ValueError, match="unknown method"):
        unlearn(unet, x, "esd", sched, **FAST)
    with pytest.raises(TypeError, match="unknown unlearn option"):
        unlearn(unet, x, "neggrad", sched, gama=0.5, **FAST)
    # a posterior file made for a different architecture
    other = build_unet("mnist", **{**TINY, "block_out_channels": (16, 32)})
    p = _post(other)
    path = save_posterior(tmp_path / "other.safetensors", p["mean"], p["var"], p["deployed"], 2, "test")
    with pytest.raises(ValueError, match="different architecture"):
        unlearn(unet, x, "vdu", sched, posterior=path, **FAST)


def test_config_object_and_overrides(tiny):
    unet, sched, x = tiny
    cfg = UnlearnConfig(steps=1, **FAST)
    out = unlearn(unet, x, "neggrad", sched, config=cfg, lr=1e-5)
    assert out.unlearn_log.config["lr"] == 1e-5 and cfg.lr == 1e-4  # the caller's config is not mutated


MODEL = Path(os.environ.get("VDU_TEST_MODEL", CKPT / "ddpm"))


@pytest.mark.skipif(not (MODEL / "posterior.safetensors").exists(), reason=f"no model + posterior at {MODEL}")
@pytest.mark.xfail(strict=True, reason="issue 3 open: measured on the committed model, this VDU setting collapses "
                                        "the samples (confident share -> 0) before the forget share falls; "
                                        "remove this mark once a robust setting passes")
def test_smoke_forget_share_falls_without_collapse(evaluator, mnist_test):
    """A short VDU run on class 1 (the paper's MNIST example): the class-1 share of 48 seed-bank
    samples falls (PUL > 0) while most samples stay confidently classified (not a collapse)."""
    torch.manual_seed(0)
    unet, sched = load_model(MODEL)
    forget, _ = mnist_test.split(1)
    out = unlearn(unet, forget.images[:64], "vdu", sched, posterior=MODEL / "posterior.safetensors",
                  gamma=0.5, steps=12, batch_size=16, lr=1e-4, probe_every=0, evaluator=evaluator,
                  forget_class=1, eval_every=12, eval_samples=48, eval_ddim_steps=8, progress=False)
    first, last = out.unlearn_log.evals[0], out.unlearn_log.evals[-1]
    assert first["forget_share"] > 0.03
    assert last["pul"] > 0 and last["forget_share"] < first["forget_share"]
    assert last["confident_share"] > 0.5
