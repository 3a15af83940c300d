"""Batched DDPM / DDIM sampling with diffusers schedulers, classifier-free guidance and a seed bank.

The seed bank gives sample ``i`` its own generator seeded ``seed + i``: its starting noise and
every ancestral noise draw come from it, so two models sampled from the same bank start from
identical noise, whatever the batch size (the before/after comparisons of PUL, methods.md §1).
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from .models import null_class


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

    method: 'ddim' (``steps`` steps, ``eta`` noise; eta=0 is deterministic) or 'ddpm' (ancestral,
    ``steps`` steps; use the training T for the exact DDPM sampler). ``class_labels`` (int or
    (n,) tensor) conditions a class-conditional UNet; ``guidance`` w > 0 applies classifier-free
    guidance ``eps = eps_null + (1 + w) (eps_c - eps_null)``.
    """
    if method not in ("ddim", "ddpm"):
        raise ValueError(f"method must be 'ddim' or 'ddpm', got {method!r}")
    device = device or next(unet.parameters()).device
    cls = DDIMScheduler if method == "ddim" else DDPMScheduler
    sched = cls.from_config(scheduler.config)
    sched.set_timesteps(steps)
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
        out.append(x.clamp(-1, 1).cpu())
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
