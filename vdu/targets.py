"""Score / noise-prediction form of the strong-duality unlearning targets (docs/mathematics.md §2).

Model-agnostic: every function takes noise predictions (tensors of any shape, batch first),
per-sample losses or density callables, so the same code serves the 2-D Gaussian-mixture testbed
(:mod:`vdu.gmm`) and image models. Conventions (docs/mathematics.md §0): ``s = -eps / sigma_t``,
``sigma_t = sqrt(1 - abar_t)``. Multipliers ``lam`` are 1-D (m,), one per constraint.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


def _lam(lam, kind: str) -> np.ndarray:
    lam = np.asarray(lam.detach().cpu() if torch.is_tensor(lam) else lam, dtype=float).reshape(-1)
    if (lam < 0).any():
        raise ValueError(f"multipliers must be >= 0, got {lam}")
    if kind in ("ru", "fu") and lam.sum() >= 1:
        raise ValueError(f"{kind.upper()} multipliers must sum to < 1 (dual domain), got sum {lam.sum():.6g}")
    return lam


def _stack(xs, m: int, like: torch.Tensor) -> torch.Tensor:
    xs = torch.stack(list(xs)) if not torch.is_tensor(xs) else (xs if xs.dim() == like.dim() + 1 else xs[None])
    if xs.shape[0] != m or xs.shape[1:] != like.shape:
        raise ValueError(f"expected {m} predictions of shape {tuple(like.shape)}, got {tuple(xs.shape)}")
    return xs


def ru_alpha(lam) -> np.ndarray:
    """RU guidance weights ``alpha_i = lambda_i / (1 - Lambda)`` (docs/mathematics.md §2 table, RU row)."""
    lam = _lam(lam, "ru")
    return lam / (1 - lam.sum())


def ru_eps(eps_q: torch.Tensor, eps_u, lam) -> torch.Tensor:
    """RU target ``eps* = eps_q + sum_i alpha_i (eps_q - eps_{u,i})`` (docs/mathematics.md §2, score form): the
    noise form of ``p* ∝ q prod_i (q / q_u^i)^alpha_i``. ``eps_u``: (m, ...) or a list of m tensors."""
    a = torch.as_tensor(ru_alpha(lam), dtype=eps_q.dtype, device=eps_q.device)
    eu = _stack(eps_u, len(a), eps_q)
    return eps_q + (a.reshape(-1, *[1] * eps_q.dim()) * (eps_q[None] - eu)).sum(0)


def esd_eps(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's target ``eps_uncond - eta (eps_cond - eps_uncond)`` (Gandikota et al. 2023); equals
    :func:`ru_eps` with ``q_u = q(. | c)`` and ``eta = alpha = lambda / (1 - lambda)`` (docs/mathematics.md §2)."""
    return eps_uncond - eta * (eps_cond - eps_uncond)


def fu_loss(loss_q: torch.Tensor, loss_u: Sequence[torch.Tensor], lam, normalise: bool = True) -> torch.Tensor:
    """FU primal loss ``E_q[l] - sum_i lambda_i E_{q_u^i}[l]`` (docs/mathematics.md §2, FU: retain-minus-forget with
    dual weights), divided by ``1 - Lambda`` when ``normalise``: in expectation the denoising loss of
    the target ``p* = (q - sum_i lambda_i q_u^i) / (1 - Lambda)``. ``loss_q``: per-sample losses on
    samples of q (or D_r ∪ D_f); ``loss_u``: m tensors of per-sample losses on samples of q_u^i."""
    lam = _lam(lam, "fu")
    if len(loss_u) != len(lam):
        raise ValueError(f"{len(loss_u)} forget losses for {len(lam)} multipliers")
    out = loss_q.mean() - sum(float(l) * lu.mean() for l, lu in zip(lam, loss_u))
    return out / (1 - lam.sum()) if normalise else out


def fu_weights(q_x: torch.Tensor, qu_x: torch.Tensor, lam) -> torch.Tensor:
    """Per-sample importance weights ``(1 - sum_i lambda_i q_u^i(x)/q(x)) / (1 - Lambda)`` for samples of
    q: ``E_q[w l] = E_{p*}[l]`` (the FU target, docs/mathematics.md §2), a lower-variance form of :func:`fu_loss`
    when densities are known. ``qu_x``: (m, N)."""
    lam = torch.as_tensor(_lam(lam, "fu"), dtype=q_x.dtype, device=q_x.device)
    w = 1 - (lam[:, None] * qu_x.reshape(len(lam), -1)).sum(0) / q_x
    if (w < -1e-9).any():
        raise ValueError("lambda is outside the FU dual domain at these samples (q - sum lambda q_u < 0)")
    return w.clamp_min(0) / (1 - lam.sum())


def _grad_density(qu: Callable, x: torch.Tensor) -> torch.Tensor:
    """``grad_x qu(x)``; differentiable (create_graph) when ``x`` is already part of a graph."""
    if x.requires_grad:
        return torch.autograd.grad(qu(x).sum(), x, create_graph=True)[0]
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(qu(x).sum(), x)[0]


def lu_score(score_q: torch.Tensor, x: torch.Tensor, qu: Sequence[Callable], lam) -> torch.Tensor:
    """LU target score ``s* = s_q - sum_i lambda_i grad_x q_u^i(x)`` (docs/mathematics.md §2): the score of
    ``p* ∝ q exp(-sum_i lambda_i q_u^i)``, negative guidance weighted by the forget likelihood.
    ``qu``: m callables returning per-sample densities (differentiable in x)."""
    lam = _lam(lam, "lu")
    if len(qu) != len(lam):
        raise ValueError(f"{len(qu)} forget densities for {len(lam)} multipliers")
    return score_q - sum(float(l) * _grad_density(f, x) for l, f in zip(lam, qu) if l != 0)


def lu_eps(eps_q: torch.Tensor, x: torch.Tensor, qu: Sequence[Callable], lam, sigma) -> torch.Tensor:
    """Noise form of :func:`lu_score`: ``eps* = eps_q + sigma_t sum_i lambda_i grad_x q_u^i(x)``."""
    sigma = torch.as_tensor(sigma, dtype=eps_q.dtype, device=eps_q.device).reshape(-1, *[1] * (eps_q.dim() - 1))
    return -sigma * lu_score(-eps_q / sigma, x, qu, lam)


def eps_to_score(eps: torch.Tensor, sigma) -> torch.Tensor:
    """``s = -eps / sigma_t`` (docs/mathematics.md §0)."""
    sigma = torch.as_tensor(sigma, dtype=eps.dtype, device=eps.device).reshape(-1, *[1] * (eps.dim() - 1))
    return -eps / sigma
