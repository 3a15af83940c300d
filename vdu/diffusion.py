"""The DDPM mathematics in one place (docs/mathematics.md §0): the forward process, the noise-prediction error,
L_simple and the ELBO weights, the per-image NLL bound in bits/dim, and the samplers.

Training, every unlearning method, the evaluation and the benchmark call these functions; nothing
else in the package re-implements a piece of the diffusion process.

**Forward process.** ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``: :func:`forward_noise`
returns ``(x_t, t, eps)`` with t ~ U{0..T-1} (0-based scheduler indices) and eps ~ N(0, I).

**Losses.** :func:`noise_prediction_error` is the per-pixel ``(eps - eps_theta(x_t, t))^2``;
:func:`denoising_loss` its mean (L_simple); :func:`timestep_weights` the weights ``C_t`` (1, or the
ELBO weights ``w_t`` of :func:`elbo_weights`).

**NLL bound** (the ``image_nll`` of improved-diffusion, re-derived for diffusers' epsilon schedulers)::

    -log p(x_0) <= L_T + sum_{t=2}^{T} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                          (prior, closed form)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
            = w_t ||eps - eps_theta(x_t, t)||^2,  w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t))
    L_0     = -log of the discretised Gaussian decoder p(x_0 | x_1) on the 256 pixel bins.

sigma_t^2 is the posterior variance beta~_t ('fixed_small', what our sampler uses) with t=1 clipped
to beta~_2 as in improved-diffusion. The sum over t is exact with ``timesteps=None`` (T network calls
per image) or a stratified estimate with one t drawn in each of ``timesteps`` equal strata
(unbiased; the same strata for every image).

**Sampling** with a seed bank: sample ``i`` of bank ``seed`` has its own generator (``seed *
1_000_003 + i``); its starting noise and every ancestral noise draw come from it, so two models
sampled from the same bank start from identical noise, whatever the batch size (the before/after
comparisons of PUL). DDIM, ancestral DDPM and DPM-Solver++ (diffusers' multistep scheduler).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from .models import null_class

SAMPLERS = ("ddim", "ddpm", "dpm")
WEIGHTINGS = ("simple", "elbo")


# ---------------------------------------------------------------- forward process and losses
def forward_noise(scheduler, x0, generator=None, t=None, eps=None):
    """The forward process of docs/mathematics.md §0: ``(x_t, t, eps)`` with t ~ U{0..T-1} (0-based scheduler
    indices) and eps ~ N(0, I) drawn from ``generator`` (t first) unless given."""
    g_dev = generator.device if generator is not None else x0.device
    if t is None:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator, device=g_dev)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=g_dev)
    t, eps = t.to(x0.device), eps.to(x0.device)
    return scheduler.add_noise(x0, eps, t), t, eps


def noise_prediction_error(unet, scheduler, x0, labels=None, generator=None, t=None, eps=None):
    """Per-pixel ``(eps - eps_theta(x_t, t))^2`` of docs/mathematics.md §0, shape (batch, pixels), and the t used
    (t and eps as in :func:`forward_noise`)."""
    xt, t, eps = forward_noise(scheduler, x0, generator, t, eps)
    pred = unet(xt, t, class_labels=labels).sample
    return F.mse_loss(pred.float(), eps, reduction="none").flatten(1), t


def denoising_loss(unet, scheduler, x0, labels=None, generator=None, reduction="mean"):
    """L_simple of docs/mathematics.md §0: ``||eps - eps_theta(x_t, t)||^2`` with t ~ U{1..T}, eps ~ N(0, I).

    ``reduction='none'`` returns one value per image (mean over pixels)."""
    per = noise_prediction_error(unet, scheduler, x0, labels, generator)[0].mean(1)
    return per.mean() if reduction == "mean" else per


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
    if getattr(unet, "latent_space", False):
        raise ValueError("the NLL bound in bits/dim is defined for images in [-1, 1] (a discretised decoder over "
                         "256 levels), not for VAE latents: use the denoising loss to compare latent models")
    from .models import check_images

    check_images(unet, x0)
    if timesteps is not None and (isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1):
        raise ValueError(f"timesteps must be None (the exact sum over all T) or an integer >= 1 (stratified "
                         f"estimate), got {timesteps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n_embeds = getattr(unet.config, "num_class_embeds", None)
    if class_labels is not None:
        if n_embeds is None:
            raise ValueError("class_labels given but the model is unconditional: pass class_labels=None")
        lab = torch.as_tensor(class_labels)
        if lab.shape != (len(x0),) or lab.is_floating_point() or lab.min() < 0 or lab.max() >= n_embeds:
            raise ValueError(f"class_labels must be {len(x0)} integer ids in [0, {n_embeds - 1}] (one per image; "
                             f"{n_embeds - 1} is the null class), got shape {tuple(lab.shape)}")
    elif n_embeds is not None:
        raise ValueError(f"the model is class-conditional: pass class_labels (one id per image; the unconditional "
                         f"bound is class_labels=torch.full((n,), {n_embeds - 1}), the null class)")
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


def timestep_weights(scheduler, weighting: str = "simple", normalization: str = "mean") -> torch.Tensor:
    """``C_t`` for t = 1..T (index t-1): ones, or the ELBO weights (rescaled to mean 1 for 'mean')."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    T = scheduler.config.num_train_timesteps
    if weighting == "simple":
        return torch.ones(T)
    w = elbo_weights(scheduler)
    return w / w.mean() if normalization == "mean" else w


# ---------------------------------------------------------------- samplers
def seed_bank(n: int, seed: int = 0, start: int = 0) -> list[torch.Generator]:
    """Generators for samples ``start .. start+n-1`` of the bank ``seed``."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(n)]


def _noise(shape, gens, device):
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


@torch.no_grad()
def sample(unet, scheduler, n: int, seed: int = 0, method: str = "ddim", steps: int = 50,
           class_labels=None, guidance: float = 0.0, batch_size: int = 250, eta: float = 0.0,
           device=None, progress: bool = True) -> torch.Tensor:
    """Draw ``n`` samples in [-1, 1] from the seed bank ``seed``.

    method: 'ddim' (``steps`` steps, ``eta`` noise; eta=0 is deterministic), 'ddpm' (ancestral,
    ``steps`` steps; use the training T for the exact DDPM sampler) or 'dpm' (DPM-Solver++ 2M,
    deterministic, diffusers' multistep scheduler: good samples in ~10 steps). ``class_labels`` (int or
    (n,) tensor) conditions a class-conditional UNet; ``guidance`` w > 0 applies classifier-free
    guidance ``eps = eps_null + (1 + w) (eps_c - eps_null)``.
    """
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {SAMPLERS}, got {method!r}")
    if not isinstance(n, int) or n < 1 or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"need n >= 1 samples and steps >= 1 (got n={n!r}, steps={steps!r})")
    device = device or next(unet.parameters()).device
    if method == "dpm":
        sched = DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++")
    else:
        sched = (DDIMScheduler if method == "ddim" else DDPMScheduler).from_config(scheduler.config)
    null = null_class(unet)
    if class_labels is not None:
        if null is None:
            raise ValueError("class_labels given but the model is unconditional")
        labels = torch.as_tensor(class_labels).long().expand(n) if torch.as_tensor(class_labels).ndim == 0 \
            else torch.as_tensor(class_labels).long()
        if labels.shape != (n,) or labels.min() < 0 or labels.max() >= null:
            raise ValueError(f"class_labels must be {n} ids in [0, {null - 1}]")
    elif null is not None:
        labels = torch.full((n,), null)
    else:
        labels = None
    c, s = unet.config.in_channels, unet.config.sample_size
    shape = (c, s, s) if isinstance(s, int) else (c, *s)
    was_training = unet.training
    unet.eval()
    out = []
    bar = tqdm(total=n * steps, desc=f"sample {method}", disable=not progress, unit="img·step")
    for b in range(0, n, batch_size):
        gens = seed_bank(min(batch_size, n - b), seed, start=b)
        sched.set_timesteps(steps)        # per batch: the multistep solver keeps a history
        x = _noise(shape, gens, device)
        lab = labels[b:b + len(gens)].to(device) if labels is not None else None
        for t in sched.timesteps:
            tt = torch.full((len(x),), int(t), device=device)
            if lab is not None and guidance and null is not None and (lab != null).any():
                eps2 = unet(torch.cat([x, x]), torch.cat([tt, tt]),
                            class_labels=torch.cat([lab, torch.full_like(lab, null)])).sample
                eps_c, eps_u = eps2.chunk(2)
                eps = eps_u + (1 + guidance) * (eps_c - eps_u)
            else:
                eps = unet(x, tt, class_labels=lab).sample
            kw = dict(eta=eta) if method == "ddim" else {}
            g = gens if (method == "ddpm" or eta > 0) else None
            x = _step(sched, eps, t, x, g, **kw)
            bar.update(len(x))
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"the model produced non-finite samples (NaN/inf in {int((~torch.isfinite(x)).sum())} "
                                     f"values): its weights have diverged; these samples cannot be scored")
        out.append((x if getattr(unet, "latent_space", False) else x.clamp(-1, 1)).cpu())   # latents: any range
    bar.close()
    unet.train(was_training)
    return torch.cat(out)


def _step(sched, eps, t, x, gens, **kw):
    """One scheduler step whose noise comes from the per-sample generators (CPU), not the device RNG."""
    if gens is None:
        return sched.step(eps, t, x, **kw).prev_sample
    if isinstance(sched, DDIMScheduler):
        return sched.step(eps, t, x, variance_noise=_noise(x.shape[1:], gens, x.device), **kw).prev_sample
    # DDPMScheduler.step draws its own noise: give it the deterministic draw through a generator list
    return sched.step(eps, t, x, generator=gens, **kw).prev_sample
