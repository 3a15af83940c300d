"""VDU / NegGrad losses (vdu.methods.vdu, docs/mathematics.md §1) against hand computations on a tiny UNet."""
import pytest
import torch

from conftest import tiny_unet
from vdu import diffusion
from vdu.methods import neggrad
from vdu.methods import vdu as objectives
from vdu.diffusion import elbo_weights
from vdu.models import build_scheduler


def _posterior(unet, seed=1, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    mean, var, dep = {}, {}, {}
    for n, p in unet.named_parameters():
        dep[n] = p.detach().clone()
        mean[n] = p.detach() + scale * torch.randn(p.shape, generator=g)
        var[n] = (torch.rand(p.shape, generator=g) * 1e-3).clamp_min(1e-9)
    return {"mean": mean, "var": var, "deployed": dep, "k": 2, "method": "test"}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    unet, sched = tiny_unet(), build_scheduler()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    t = torch.tensor([5, 400, 990])
    eps = torch.randn(3, 1, 28, 28)
    return unet, sched, x, t, eps, _posterior(unet)


def _hand_sq(unet, sched, x, t, eps):
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x + (1 - ab).sqrt() * eps
    with torch.no_grad():
        pred = unet(xt, t).sample
    return ((eps - pred) ** 2).flatten(1)  # (b, D)


@pytest.mark.parametrize("weighting", ["simple", "elbo"])
def test_plasticity_inducer_matches_hand_computation(setup, weighting):
    unet, sched, x, t, eps, _ = setup
    sq = _hand_sq(unet, sched, x, t, eps)
    w = torch.ones(1000) if weighting == "simple" else elbo_weights(sched)
    T, b, D = 1000, 3, 28 * 28
    with torch.no_grad():
        a_sum, per = objectives.plasticity_inducer(unet, sched, x, weighting, "sum", dataset_size=30, t=t, eps=eps)
        a_mean, _ = objectives.plasticity_inducer(unet, sched, x, weighting, "mean", t=t, eps=eps)
    # literal: -(N_f / b) * sum_x T * C_t * ||eps - eps_theta||^2 (pixels summed)
    expect_sum = -(30 / b) * T * (w[t] * sq.sum(1)).sum()
    expect_mean = -((w[t] / w.mean()) * sq.mean(1)).mean()
    torch.testing.assert_close(a_sum, expect_sum, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(a_mean, expect_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(per, sq.mean(1), rtol=1e-4, atol=1e-6)
    if weighting == "simple":  # "mean" + simple is exactly -L_simple
        assert a_mean.item() == pytest.approx(-sq.mean().item(), rel=1e-5)


@pytest.mark.parametrize("normalization", ["sum", "mean"])
@pytest.mark.parametrize("center", ["mean", "deployed"])
def test_stability_regularizer_matches_hand_computation(setup, normalization, center):
    unet, _, _, _, _, post = setup
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1e-3)
    try:
        mu = post["mean" if center == "mean" else "deployed"]
        num = sum(((p.detach() - mu[n]) ** 2 / (2 * post["var"][n].clamp_min(1e-8))).sum().double()
                  for n, p in unet.named_parameters())
        P = sum(p.numel() for p in unet.parameters())
        expect = num / P if normalization == "mean" else num
        B = objectives.stability_regularizer(unet, post, center, normalization)
        assert B.item() == pytest.approx(expect.item(), rel=1e-4)
    finally:
        with torch.no_grad():
            for p in unet.parameters():
                p.sub_(1e-3)


def test_regularizer_zero_at_center_and_gradient(setup):
    unet, _, _, _, _, post = setup
    for center in ("mean", "deployed"):
        u = tiny_unet()
        src = post[center if center == "mean" else "deployed"]
        u.load_state_dict({**u.state_dict(), **src})
        reg = objectives.StabilityRegularizer(u, post, center, "sum")
        B = reg(u)
        assert B.item() == 0.0
        B.backward()
        assert all(p.grad.abs().max() == 0 for p in u.parameters())
    # away from mu*, dB/dtheta = (theta - mu) / sigma^2 (sum normalisation)
    u = tiny_unet()
    reg = objectives.StabilityRegularizer(u, post, "mean", "sum", var_floor=1e-6)
    reg(u).backward()
    n, p = next(iter(u.named_parameters()))
    torch.testing.assert_close(p.grad, (p.detach() - post["mean"][n]) / post["var"][n].clamp_min(1e-6))


def test_vdu_loss_combination_and_neggrad(setup):
    unet, sched, x, t, eps, post = setup
    reg = objectives.StabilityRegularizer(unet, post, "mean", "mean")
    with torch.no_grad():
        for gamma in (0.0, 0.3, 1.0):
            out = objectives.vdu_loss(unet, sched, x, reg, gamma, t=t, eps=eps)
            assert out["loss"].item() == pytest.approx(gamma * out["B"].item() + (1 - gamma) * out["A"].item(), rel=1e-6)
        ng = neggrad.neggrad_loss(unet, sched, x, t=t, eps=eps)
    assert ng["loss"].item() == pytest.approx(-_hand_sq(unet, sched, x, t, eps).mean().item(), rel=1e-5)
    assert "B" not in ng


def test_bad_inputs(setup):
    unet, sched, x, t, eps, post = setup
    reg = objectives.StabilityRegularizer(unet, post)
    for gamma in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            objectives.vdu_loss(unet, sched, x, reg, gamma)
    with pytest.raises(ValueError, match="normalization"):
        objectives.StabilityRegularizer(unet, post, normalization="median")
    with pytest.raises(ValueError, match="center"):
        objectives.StabilityRegularizer(unet, post, center="ema")
    with pytest.raises(ValueError, match="weighting"):
        diffusion.timestep_weights(sched, "vlb")
    other = tiny_unet()
    other_post = _posterior(tiny_unet(), seed=2)
    other_post["mean"] = {k: v[..., :1] if v.ndim > 1 else v for k, v in other_post["mean"].items()}
    with pytest.raises(ValueError, match="different architecture"):
        objectives.StabilityRegularizer(other, other_post)
    with pytest.raises(ValueError, match="empty"):
        objectives.plasticity_inducer(unet, sched, x[:0])
