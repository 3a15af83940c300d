"""Per-image NLL upper bound in bits/dim from the DDPM variational bound (methods.md §0; the
``image_nll`` of improved-diffusion, re-derived for diffusers' epsilon-prediction schedulers).

    -log p(x_0) <= L_T + sum_{t=2}^{T} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                          (prior, closed form)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
            = w_t ||eps - eps_theta(x_t, t)||^2,  w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t))
    L_0     = -log of the discretised Gaussian decoder p(x_0 | x_1) on the 256 pixel bins.

sigma_t^2 is the posterior variance beta~_t ('fixed_small', what our sampler uses) with t=1
clipped to beta~_2 as in improved-diffusion. The sum over t is exact with ``timesteps=None``
(T network calls per image) or a stratified estimate with one t drawn in each of ``timesteps``
equal strata (unbiased; the same strata for every image).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def _schedule(scheduler, device):
    betas = scheduler.betas.double().to(device)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype, device=device), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    sigma2 = torch.cat([post_var[1:2], post_var[1:]])  # clip t=1 as improved-diffusion does
    return betas, alphas, abar, sigma2


def elbo_weights(scheduler) -> torch.Tensor:
    """The ELBO weights w_t (index k = t - 1) multiplying ``||eps - eps_theta||^2`` summed over pixels."""
    betas, alphas, abar, sigma2 = _schedule(scheduler, "cpu")
    return (betas ** 2 / (2 * sigma2 * alphas * (1 - abar))).float()


def _discretized_gaussian_nll(x0, mean, log_scale):
    """-log P(bin of x0) under N(mean, exp(log_scale)^2) on 256 bins over [-1, 1] (edge bins open)."""
    inv = torch.exp(-log_scale)
    plus = torch.special.ndtr(inv * (x0 - mean + 1 / 255))
    minus = torch.special.ndtr(inv * (x0 - mean - 1 / 255))
    lo = torch.log(plus.clamp_min(1e-12))
    hi = torch.log((1 - minus).clamp_min(1e-12))
    mid = torch.log((plus - minus).clamp_min(1e-12))
    logp = torch.where(x0 < -0.999, lo, torch.where(x0 > 0.999, hi, mid))
    return -logp


@torch.no_grad()
def nll_bits_per_dim(unet, scheduler, x0: torch.Tensor, class_labels=None, timesteps: int | None = 100,
                     seed: int = 0, batch_size: int = 256, return_terms: bool = False, progress: bool = True):
    """Upper bound on -log2 p(x_0) / D for each image of ``x0`` (in [-1, 1], on the 8-bit grid).

    ``timesteps=None``: exact sum over all T; an int: stratified estimate with that many terms.
    With ``return_terms`` also returns the prior, decoder and diffusion parts (bits/dim)."""
    from .models import check_images

    check_images(unet, x0)
    device = next(unet.parameters()).device
    T = scheduler.config.num_train_timesteps
    betas, alphas, abar, sigma2 = _schedule(scheduler, device)
    w = betas ** 2 / (2 * sigma2 * alphas * (1 - abar))
    gen = torch.Generator().manual_seed(seed)
    if timesteps is None or timesteps >= T - 1:
        ks, weights = torch.arange(1, T), torch.ones(T - 1)
    else:
        edges = torch.linspace(1, T, timesteps + 1).round().long()
        lo, size = edges[:-1], (edges[1:] - edges[:-1])
        ks = lo + (torch.rand(timesteps, generator=gen) * size).long()
        weights = size.double()
    dims = x0[0].numel()
    was = unet.training
    unet.eval()
    prior, dec, diff = [], [], []
    bar = tqdm(total=len(x0) * (len(ks) + 1), desc="NLL bound", disable=not progress, unit="img·t")
    for b in range(0, len(x0), batch_size):
        x = x0[b:b + batch_size].to(device).double()
        lab = None if class_labels is None else torch.as_tensor(class_labels)[b:b + batch_size].to(device)
        n = len(x)
        aT = abar[-1]
        prior.append((0.5 * (-torch.log(1 - aT) + (1 - aT) + aT * x ** 2 - 1)).flatten(1).sum(1))
        # decoder term at t = 1 (index 0)
        eps = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device)
        x1 = abar[0].sqrt() * x + (1 - abar[0]).sqrt() * eps
        e = unet(x1.float(), torch.zeros(n, dtype=torch.long, device=device), class_labels=lab).sample.double()
        mean = (x1 - betas[0] / (1 - abar[0]).sqrt() * e) / alphas[0].sqrt()
        dec.append(_discretized_gaussian_nll(x, mean, 0.5 * torch.log(sigma2[0])).flatten(1).sum(1))
        bar.update(n)
        acc = torch.zeros(n, dtype=torch.float64, device=device)
        for k, wt in zip(ks.tolist(), weights.tolist()):
            eps = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device)
            xt = abar[k].sqrt() * x + (1 - abar[k]).sqrt() * eps
            e = unet(xt.float(), torch.full((n,), k, device=device), class_labels=lab).sample.double()
            acc += wt * w[k] * (eps - e).pow(2).flatten(1).sum(1)
            bar.update(n)
        diff.append(acc)
    bar.close()
    unet.train(was)
    to_bpd = 1 / (dims * math.log(2))
    prior, dec, diff = (torch.cat(v).float().cpu() * to_bpd for v in (prior, dec, diff))
    total = prior + dec + diff
    if return_terms:
        return total, {"prior": prior, "decoder": dec, "diffusion": diff}
    return total
