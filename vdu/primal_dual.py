"""One generic primal-dual engine for constrained unlearning (docs/mathematics.md §2, "Primal-dual algorithm").

Problem form: ``min_theta f(theta)  s.t.  g_i(theta) <= 0`` (i = 1..m), with the convention that
``violations[i] = g_i`` is positive when constraint i is violated (its slack is ``-g_i``):

- RU: ``g_i = b_i - KL(p_theta || q_u^i)``;  FU: ``g_i = b_i - KL(q_u^i || p_theta)``;
  LU: ``g_i = E_{x~p_theta}[q_u^i(x)] - eps_i``.

Primal: optimiser steps (AdamW, weight decay 0 by default) on the empirical Lagrangian
``f + sum_i lambda_i g_i`` (or on a surrogate loss with the same minimiser, e.g. denoising on the
Lagrangian minimiser). Dual: every ``dual_every`` primal steps,
``lambda <- proj_D(lambda + eta * g)`` onto the problem's dual domain ``D`` (:class:`DualDomain`).
A multiplier pinned at an upper face of ``D`` while its constraint stays violated for ``patience``
dual steps raises :class:`InfeasibleConstraint` (with the logs) instead of looping.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


class InfeasibleConstraint(RuntimeError):
    """A constraint no admissible multiplier can enforce (the threshold is infeasible or its
    optimum is not attained). ``index``, ``lam``, ``violation`` and ``result`` (logs) say which."""

    def __init__(self, message: str, index: int | None = None, lam=None, violation=None, result=None):
        super().__init__(message)
        self.index, self.lam, self.violation, self.result = index, lam, violation, result


def _project_capped_simplex(v: np.ndarray, s: float) -> np.ndarray:
    """Euclidean projection of ``v`` onto ``{x >= 0, sum x <= s}``."""
    x = np.maximum(v, 0.0)
    if x.sum() <= s:
        return x
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - s
    k = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[k] / (k + 1), 0.0)


@dataclass
class DualDomain:
    """Dual domain of one problem (docs/mathematics.md §2 table, last column).

    - ``"ru"``: ``lambda >= 0``, ``sum lambda <= 1 - margin`` (the dual function is -inf at ``sum >= 1``);
    - ``"fu"``: ``lambda >= 0``, ``lambda_i <= cap_i`` where the box ``[0, cap]`` must lie inside
      ``{q - sum lambda_i q_u^i >= 0}`` (``vdu.gmm.Problem.dual_domain`` computes it; required);
    - ``"lu"``: ``lambda >= 0`` (optionally ``<= cap``; without a cap infeasibility is not detected
      by pinning, check it exactly first, e.g. ``vdu.gmm.Problem.check_feasible``).
    """
    kind: str
    m: int = 1
    cap: Sequence[float] | None = None
    margin: float = 1e-3

    def __post_init__(self):
        if self.kind not in ("ru", "fu", "lu"):
            raise ValueError(f"kind must be 'ru', 'fu' or 'lu', not {self.kind!r}")
        if self.m < 1:
            raise ValueError("need at least one constraint (m >= 1)")
        if self.cap is not None:
            self.cap = np.broadcast_to(np.asarray(self.cap, dtype=float), (self.m,)).copy()
            if (self.cap < 0).any():
                raise ValueError(f"caps must be >= 0, got {self.cap}")
        elif self.kind == "fu":
            raise ValueError("the FU dual domain {q - sum lambda_i q_u^i >= 0} needs caps (cap=...)")

    def project(self, lam) -> tuple[np.ndarray, np.ndarray]:
        """``(proj_D(lam), pinned)``; ``pinned[i]`` is True where an upper face of D is active."""
        lam = np.asarray(lam, dtype=float).reshape(-1)
        if lam.shape != (self.m,):
            raise ValueError(f"expected {self.m} multipliers, got shape {lam.shape}")
        out = np.maximum(lam, 0.0)
        pinned = np.zeros(self.m, bool)
        if self.cap is not None:
            pinned |= out >= self.cap
            out = np.minimum(out, self.cap)
        if self.kind == "ru" and out.sum() > 1 - self.margin:
            out = _project_capped_simplex(out, 1 - self.margin)
            pinned |= out > 0
        return out, pinned

    def check(self, lam, tol: float = 1e-12) -> np.ndarray:
        """Raise ValueError if ``lam`` lies outside the domain; return it as an array."""
        lam = np.asarray(lam, dtype=float).reshape(-1)
        proj, _ = self.project(lam)
        if np.abs(proj - lam).max() > tol:
            raise ValueError(f"lambda = {lam} lies outside the {self.kind.upper()} dual domain "
                             f"(nearest admissible: {proj})")
        return lam


def lagrangian(objective: torch.Tensor, violations: torch.Tensor, lam) -> torch.Tensor:
    """Empirical Lagrangian ``f + sum_i lambda_i g_i`` (docs/mathematics.md §2)."""
    lam = torch.as_tensor(np.asarray(lam), dtype=violations.dtype, device=violations.device)
    return objective + (lam * violations.reshape(-1)).sum()


@dataclass
class PDResult:
    """Logs of one run: ``history`` (one dict per primal step: step, loss, objective?) and
    ``dual_history`` (one per dual step: step, lam (after the update), objective, violations)."""
    lam: np.ndarray
    history: list = field(default_factory=list)
    dual_history: list = field(default_factory=list)

    def arrays(self) -> dict:
        """The dual log as arrays: step (n,), lam (n, m), violations (n, m), objective (n,)."""
        d = self.dual_history
        return {"step": np.array([r["step"] for r in d]), "lam": np.array([r["lam"] for r in d]),
                "violations": np.array([r["violations"] for r in d]),
                "objective": np.array([r["objective"] for r in d])}

    def lam_average(self, last: float = 0.5) -> np.ndarray:
        """Average of the multipliers over the last ``last`` fraction of dual steps (the usual
        output of stochastic primal-dual methods; the final iterate oscillates)."""
        lam = self.arrays()["lam"]
        if len(lam) == 0:
            return self.lam
        return lam[-max(1, int(round(last * len(lam)))):].mean(0)


class DualAscent:
    """Projected dual ascent on the multipliers, shared by :func:`primal_dual` and the constrained
    unlearning methods (``vdu.methods.ru``, VDU's likelihood constraint).

    ``observe(violations)`` after every primal step; ``step(step)`` every primal step: on every
    ``every``-th call it sets ``lam <- proj_D(lam + eta * mean(observed violations))`` (or uses
    ``violations=`` if given), logs ``{"step", "lam", "objective", "violations"}`` in ``history`` and
    raises :class:`InfeasibleConstraint` when a multiplier has sat at an upper face of the domain with
    its constraint violated by more than ``tol`` for ``patience`` consecutive dual steps. Returns the
    log record on a dual step, else None."""

    def __init__(self, domain: DualDomain, lr=0.1, every: int = 1, lam0=None, patience: int = 20,
                 tol: float = 0.0):
        if every < 1 or patience < 1:
            raise ValueError(f"dual every and patience must be >= 1, got {every}, {patience}")
        self.domain, self.every, self.patience, self.tol = domain, int(every), int(patience), float(tol)
        m = domain.m
        self.lam = domain.check(np.zeros(m) if lam0 is None else lam0).copy()
        self.eta = np.broadcast_to(np.asarray(lr, dtype=float), (m,)).copy()
        if (self.eta < 0).any() or not np.isfinite(self.eta).all():
            raise ValueError(f"dual learning rates must be finite and >= 0, got {lr}")
        self.history: list = []
        self._window, self._objective = [], []
        self._stuck = np.zeros(m, int)

    def observe(self, violations, objective=None) -> None:
        v = np.asarray(torch.as_tensor(violations).detach().cpu().double().reshape(-1).numpy()
                       if torch.is_tensor(violations) else violations, dtype=float).reshape(-1)
        if v.shape != (self.domain.m,):
            raise ValueError(f"got {v.shape[0]} violations for {self.domain.m} multipliers")
        self._window.append(v)
        if objective is not None:
            self._objective.append(float(objective))

    def step(self, step: int, violations=None, objective=None) -> dict | None:
        if step % self.every:
            return None
        if violations is None:
            if not self._window:
                raise ValueError("no violations to update the multipliers: observe() them or pass violations=")
            viol = np.mean(self._window, 0)
            obj = float(np.mean(self._objective)) if self._objective else float("nan")
        else:
            viol = np.asarray(violations, dtype=float).reshape(-1)
            obj = float("nan") if objective is None else float(objective)
        if viol.shape != (self.domain.m,):
            raise ValueError(f"expected {self.domain.m} violations, got {viol.shape}")
        self._window, self._objective = [], []
        self.lam, pinned = self.domain.project(self.lam + self.eta * viol)
        rec = {"step": step, "lam": self.lam.tolist(), "objective": obj, "violations": viol.tolist()}
        self.history.append(rec)
        # a multiplier held fixed (dual lr 0) at the boundary is a choice, not a runaway
        self._stuck = np.where(pinned & (viol > self.tol) & (self.eta > 0), self._stuck + 1, 0)
        if (self._stuck >= self.patience).any():
            i = int(np.argmax(self._stuck))
            raise InfeasibleConstraint(
                f"constraint {i} stayed violated (g = {viol[i]:.4g} > tol = {self.tol:g}) for {self._stuck[i]} dual "
                f"steps with lambda_{i} = {self.lam[i]:.4g} pinned at the boundary of the "
                f"{self.domain.kind.upper()} dual domain: the threshold is infeasible (or its optimum is not "
                "attained) — loosen it", index=i, lam=self.lam.copy(), violation=viol.copy())
        return rec


def primal_dual(params, lagrangian_fn: Callable, domain: DualDomain, *, steps: int, dual_every: int = 1,
                dual_lr=0.1, lam0=None, lr: float = 1e-3, weight_decay: float = 0.0, optimizer=None,
                evaluate: Callable | None = None, patience: int = 20, tol: float = 0.0, seed: int = 0,
                progress: bool = True, desc: str = "primal-dual") -> PDResult:
    """Run the primal-dual algorithm of docs/mathematics.md §2.

    ``lagrangian_fn(lam: np.ndarray) -> dict`` with either ``objective`` (tensor) and ``violations``
    (tensor (m,)), whose Lagrangian ``objective + lam . violations`` is minimised, or ``loss`` (a
    surrogate with the same minimiser in theta, e.g. a denoising loss on the Lagrangian minimiser)
    plus optional ``objective``/``violations`` for the log. ``evaluate(step) -> dict(objective=float,
    violations=array)`` estimates the constraints for the dual step (default: the mean of the
    primal-step ``violations`` since the last dual step). ``dual_lr`` is a scalar or one per
    constraint. Seeds torch with ``seed``. Returns :class:`PDResult`; raises
    :class:`InfeasibleConstraint` if a multiplier sits at an upper face of the dual domain while its
    constraint stays violated by more than ``tol`` for ``patience`` consecutive dual steps.
    """
    torch.manual_seed(seed)
    params = [p for p in params]
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    m = domain.m
    dual = DualAscent(domain, dual_lr, dual_every, lam0, patience, tol)
    res = PDResult(lam=dual.lam.copy(), dual_history=dual.history)
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, mininterval=1.0)
    for step in bar:
        lam = dual.lam
        out = lagrangian_fn(lam.copy())
        if "loss" in out:
            loss = out["loss"]
        else:
            loss = lagrangian(out["objective"], out["violations"], lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec = {"step": step, "loss": float(loss.detach())}
        if "objective" in out:
            rec["objective"] = float(torch.as_tensor(out["objective"]).detach())
        if "violations" in out:
            v = torch.as_tensor(out["violations"]).detach().reshape(-1).cpu().numpy()
            if v.shape != (m,):
                raise ValueError(f"lagrangian_fn returned {v.shape[0]} violations for {m} multipliers")
            rec["violations"] = v.tolist()
            dual.observe(v, rec.get("objective", np.nan))
        res.history.append(rec)
        if step % dual_every:
            continue
        ev = evaluate(step) if evaluate is not None else None
        try:
            if ev is not None:
                dual.step(step, ev["violations"], ev.get("objective", np.nan))
            else:
                dual.step(step)
        except InfeasibleConstraint as e:
            res.lam = dual.lam.copy()
            e.result = res
            raise
        res.lam = dual.lam.copy()
        bar.set_postfix(lam=np.array2string(res.lam, precision=3),
                        viol=np.array2string(np.asarray(dual.history[-1]["violations"]), precision=3))
    return res
