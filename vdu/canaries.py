"""Canaries: real training digits carrying a distinctive mark, so that data unlearning is measurable.

No MNIST model memorises single images, so a *canary model* is trained on the data plus a few marked
digits (a bright square in the empty bottom-right margin of the 28x28 frame), with a second set of
marked digits it never sees. Then (docs/mathematics.md §4):

- the **mark rate** of generated samples (a deterministic detector, not a classifier) says how much of
  the canaries the model reproduces;
- the **membership gap**, NLL bound of the trained canaries minus that of the held-out ones, says how
  much better the model explains the images it was trained on; retraining without them closes it.

    from vdu.canaries import canary_sets, mark_rate
    trained, held_out = canary_sets(load_dataset("mnist", "train"), 32)
"""
from __future__ import annotations

import torch

from .data import ImageData

SIZE = 4          # side of the square mark, pixels
OFFSET = 23       # top-left corner (row = column) of the mark: inside MNIST's empty 4-pixel margin
SEED = 1234       # which training digits become canaries (fixed: the trained and held-out sets are a pair)


def add_mark(images: torch.Tensor, size: int = SIZE, offset: int = OFFSET, value: float = 1.0) -> torch.Tensor:
    """A copy of ``images`` (N, C, H, W in [-1, 1]) with a ``size`` x ``size`` square of ``value`` at
    (``offset``, ``offset``)."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if size < 1 or offset < 0 or offset + size > min(h, w):
        raise ValueError(f"a {size}-pixel mark at offset {offset} does not fit a {h}x{w} image")
    out = images.clone()
    out[..., offset:offset + size, offset:offset + size] = value
    return out


def mark_score(images: torch.Tensor, size: int = SIZE, offset: int = OFFSET) -> torch.Tensor:
    """Per image: mean intensity inside the mark's square minus the mean of the 2-pixel ring around it
    (in [-2, 2]; about 2 for a clean mark on MNIST's black margin, about 0 without one)."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    x = images.float().mean(1)                                   # (N, H, W)
    h, w = x.shape[-2:]
    r0, r1 = max(offset - 2, 0), min(offset + size + 2, h)
    c0, c1 = max(offset - 2, 0), min(offset + size + 2, w)
    box = x[:, r0:r1, c0:c1]
    inner = x[:, offset:offset + size, offset:offset + size]
    ring_n = box[0].numel() - inner[0].numel()
    ring = (box.sum((1, 2)) - inner.sum((1, 2))) / max(ring_n, 1)
    return inner.mean((1, 2)) - ring


def has_mark(images: torch.Tensor, threshold: float = 1.0, **kw) -> torch.Tensor:
    """Boolean per image: the mark is there (:func:`mark_score` >= ``threshold``; a clean mark scores ~2,
    a faint half-drawn one ~1)."""
    return mark_score(images, **kw) >= threshold


def mark_rate(images: torch.Tensor, **kw) -> float:
    """Share of ``images`` that carry the mark."""
    if not torch.isfinite(images).all():
        raise FloatingPointError("non-finite samples cannot be scored: the model has diverged")
    return float(has_mark(images, **kw).float().mean())


def canary_sets(train: ImageData, n: int, seed: int = SEED) -> tuple[ImageData, ImageData]:
    """``(trained, held_out)``: two disjoint sets of ``n`` marked training digits each, drawn with ``seed``.
    A canary model trains on the first; the second is the same kind of image it never saw marked."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or 2 * n > len(train):
        raise ValueError(f"n must be an integer in [1, {len(train) // 2}], got {n!r}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[: 2 * n]
    sets = []
    for part in (idx[:n], idx[n:]):
        d = train.subset(part)
        sets.append(ImageData(add_mark(d.images), d.labels, d.classes, f"{d.name}-canaries"))
    return sets[0], sets[1]


def evaluate_canaries(model, scheduler, evaluator, config, trained: torch.Tensor, held_out: torch.Tensor,
                      reference: torch.Tensor, samples: torch.Tensor | None = None, bootstrap: int = 1000) -> dict:
    """The data-unlearning numbers of a canary model (one seed bank, ``config``: a
    :class:`vdu.evaluation.EvalConfig`): the mark rate of its samples (with a 95% bootstrap interval),
    the confident share and domain FID of the samples against ``reference`` (real unmarked digits; with
    ``config.fid_bootstrap``, its interval over resamples of the samples), and
    the membership gap: mean NLL bound (bits/dim, ``config.nll_timesteps`` stratified terms) of the
    ``trained`` canaries minus that of the ``held_out`` ones, with a 95% bootstrap interval over images.
    A model that never saw the canaries has a gap near 0; one that memorised them, a negative gap."""
    from .diffusion import nll_bits_per_dim
    from .evaluation import _percentiles, fid_interval, measure
    from .metrics import domain_fid
    x = samples if samples is not None else config.sample(model, scheduler)
    m = measure(evaluator, x, None, None, 0, 0, config.seed)           # raises on non-finite samples
    hits = has_mark(x).float()
    g = torch.Generator().manual_seed(config.seed + 4242)
    out = {"n_samples": len(x), "mark_rate": float(hits.mean()), "confident_share": m["confident_share"],
           "fid": domain_fid(evaluator, x, reference), "fid_reference": len(reference)}
    if bootstrap:
        out["mark_rate_ci"] = _percentiles(hits[torch.randint(0, len(x), (bootstrap, len(x)), generator=g)].mean(1))
    if config.fid_bootstrap:
        out["fid_ci"] = fid_interval(evaluator, x, reference, config.fid_bootstrap, config.seed)
    if config.nll_timesteps:
        kw = dict(timesteps=config.nll_timesteps, seed=config.seed, progress=False)
        a = nll_bits_per_dim(model, scheduler, trained, **kw).double()
        b = nll_bits_per_dim(model, scheduler, held_out, **kw).double()
        out.update(nll_trained=float(a.mean()), nll_held_out=float(b.mean()), membership_gap=float(a.mean() - b.mean()))
        if bootstrap:
            ia = torch.randint(0, len(a), (bootstrap, len(a)), generator=g)
            ib = torch.randint(0, len(b), (bootstrap, len(b)), generator=g)
            out["membership_gap_ci"] = _percentiles(a[ia].mean(1) - b[ib].mean(1))
    return out
