import math

import torch

from conftest import tiny_unet
from vdu.diffusion import _discretized_gaussian_nll, elbo_weights, nll_bits_per_dim
from vdu.models import build_scheduler


class Oracle(torch.nn.Module):
    """The exact eps-predictor for data that is a single image x*: eps = (x_t - sqrt(abar) x*) / sqrt(1-abar)."""

    def __init__(self, x_star, scheduler, offset=0.0):
        super().__init__()
        self.x_star, self.abar, self.offset = x_star, scheduler.alphas_cumprod, offset
        self.config = type("C", (), {"in_channels": 1, "sample_size": 28})()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, class_labels=None):
        a = self.abar[t].view(-1, 1, 1, 1).to(x.dtype)
        return type("O", (), {"sample": (x - a.sqrt() * self.x_star) / (1 - a).sqrt() + self.offset})()


def test_oracle_bound_is_decoder_plus_prior():
    s = build_scheduler()
    x = torch.randint(0, 256, (1, 1, 28, 28)).float().div(127.5).sub(1)
    total, terms = nll_bits_per_dim(Oracle(x, s), s, x.repeat(2, 1, 1, 1), timesteps=10, return_terms=True,
                                    progress=False)
    assert terms["diffusion"].abs().max() < 1e-4  # perfect denoiser: every KL term vanishes
    betas = s.betas.double()
    abar = s.alphas_cumprod.double()
    sigma = math.sqrt(betas[1] * (1 - abar[0]) / (1 - abar[1]))
    dec = _discretized_gaussian_nll(x.double(), x.double(), torch.tensor(math.log(sigma))).sum() / (784 * math.log(2))
    assert torch.allclose(terms["decoder"], dec.float().expand(2), atol=1e-4)
    assert torch.allclose(total, terms["prior"] + terms["decoder"] + terms["diffusion"])


def test_full_and_stratified_sums_of_a_known_error():
    # eps_theta = eps + c makes every term exactly w_t * c^2 * D: the full sum is known in closed form
    s = build_scheduler(num_train_timesteps=200)
    x = torch.randint(0, 256, (2, 1, 28, 28)).float().div(127.5).sub(1)
    c = 0.05
    expected = (c ** 2 * elbo_weights(s)[1:].double().sum() / math.log(2)).item()
    _, full = nll_bits_per_dim(Oracle(x[:1], s, c), s, x[:1], timesteps=None, return_terms=True, progress=False)
    assert math.isclose(full["diffusion"].item(), expected, rel_tol=1e-4)
    strat = [nll_bits_per_dim(Oracle(x[:1], s, c), s, x[:1], timesteps=20, seed=i, return_terms=True,
                              progress=False)[1]["diffusion"].item() for i in range(300)]
    assert math.isclose(sum(strat) / len(strat), expected, rel_tol=0.05)
    assert min(strat) < expected < max(strat)


def test_elbo_weights_match_formula():
    s = build_scheduler()
    w = elbo_weights(s)
    b, a, ab = s.betas.double(), s.alphas.double(), s.alphas_cumprod.double()
    k = 500
    sig2 = b[k] * (1 - ab[k - 1]) / (1 - ab[k])
    assert math.isclose(w[k].item(), (b[k] ** 2 / (2 * sig2 * a[k] * (1 - ab[k]))).item(), rel_tol=1e-5)
    assert w.shape == (1000,) and (w > 0).all()


def test_discretised_likelihood_sums_to_one():
    mean, log_scale = torch.tensor(0.13), torch.tensor(math.log(0.3))
    bins = torch.arange(256).float().div(127.5).sub(1)
    p = torch.exp(-_discretized_gaussian_nll(bins, mean, log_scale))
    assert abs(p.sum().item() - 1) < 1e-5
