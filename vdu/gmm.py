"""Gaussian mixtures: the exact testbed of docs/mathematics.md §2.

- :class:`GMM`: density, log-density, score, seeded sampling, and the forward-process marginal
  ``q_t`` (a GMM again, so the exact noise prediction ``eps_q(x, t) = -sigma_t grad log q_t``).
- :class:`Problem`: RU / FU / LU on a 2-D grid — closed-form targets (docs/mathematics.md §2 table),
  dual functions in closed form, exact dual maximisation, duality gap, complementary slackness,
  exact feasibility checks. Integrals are Riemann sums on the grid (float64).
- A small continuous-time VP diffusion (the T -> inf limit of DDPM's linear betas 1e-4..0.02 over
  T = 1000, docs/mathematics.md §0) with an MLP noise predictor, probability-flow ODE sampling and exact
  ODE log-likelihoods (2-D divergence by autograd), and :func:`unlearn`, the primal-dual algorithm
  of :mod:`vdu.primal_dual` applied to it.
- Estimators: MMD between sample sets, kNN KL between sample sets, mode shift / mass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from scipy import optimize
from scipy.spatial import cKDTree

from . import targets
from .primal_dual import DualDomain, InfeasibleConstraint, primal_dual

LOG2PI = math.log(2 * math.pi)


def _gen(seed) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


class GMM:
    """``q = sum_k w_k N(mu_k, Sigma_k)`` in d dimensions (float64). ``covs``: (K, d, d) matrices,
    (K,) isotropic variances or a scalar variance."""

    def __init__(self, weights, means, covs):
        w = torch.as_tensor(np.asarray(weights, dtype=float))
        mu = torch.as_tensor(np.asarray(means, dtype=float))
        if mu.ndim != 2 or w.ndim != 1 or len(w) != len(mu):
            raise ValueError(f"weights (K,) and means (K, d) do not match: {tuple(w.shape)}, {tuple(mu.shape)}")
        if (w <= 0).any() or abs(float(w.sum()) - 1) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got {w.tolist()} (sum {float(w.sum()):.6g})")
        K, d = mu.shape
        c = torch.as_tensor(np.asarray(covs, dtype=float))
        if c.ndim <= 1:
            c = c.expand(K).reshape(K, 1, 1) * torch.eye(d, dtype=torch.float64)
        if c.shape != (K, d, d):
            raise ValueError(f"covs must be (K, d, d) = {(K, d, d)}, (K,) or scalar; got {tuple(c.shape)}")
        torch.linalg.cholesky(c)  # raises if not positive definite
        self.w, self.mu, self.cov = w / w.sum(), mu, c
        self.K, self.d = K, d

    def __repr__(self):
        return f"GMM(K={self.K}, d={self.d}, weights={np.round(self.w.numpy(), 4).tolist()})"

    def _x(self, x) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.shape[-1] != self.d:
            raise ValueError(f"points of dimension {x.shape[-1]} for a {self.d}-D mixture")
        return x

    def _comp(self, x, abar=None):
        """(log w_k N_k(x), Sigma_k^{-1}(x - m_k)) for the marginal at noise level abar (None = data)."""
        x = self._x(x)
        mu, cov = self.mu, self.cov
        if abar is not None:
            a = torch.as_tensor(abar, dtype=torch.float64).reshape(-1, 1, 1)  # (N or 1, 1, 1)
            mu = a.sqrt() * mu                                               # (N, K, d)
            cov = a[..., None] * cov + (1 - a[..., None]) * torch.eye(self.d, dtype=torch.float64)
        diff = x[:, None, :] - mu                                            # (N, K, d)
        L = torch.linalg.cholesky(cov)
        sol = torch.cholesky_solve(diff[..., None], L.expand(*diff.shape[:2], self.d, self.d))[..., 0]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        logc = torch.log(self.w) - 0.5 * ((diff * sol).sum(-1) + logdet + self.d * LOG2PI)
        return logc, sol

    def log_prob(self, x, abar=None) -> torch.Tensor:
        """``log q(x)`` (or ``log q_t`` of the forward process at ``abar``)."""
        return torch.logsumexp(self._comp(x, abar)[0], -1)

    def prob(self, x, abar=None) -> torch.Tensor:
        return self.log_prob(x, abar).exp()

    def responsibilities(self, x, abar=None) -> torch.Tensor:
        """Posterior ``q(k | x)``, (N, K)."""
        return torch.softmax(self._comp(x, abar)[0], -1)

    def score(self, x, abar=None) -> torch.Tensor:
        """``grad_x log q(x)`` in closed form (or of ``q_t`` at ``abar``)."""
        logc, sol = self._comp(x, abar)
        return -(torch.softmax(logc, -1)[..., None] * sol).sum(1)

    def eps(self, x, abar) -> torch.Tensor:
        """Exact noise prediction ``eps_q(x_t) = -sqrt(1 - abar) grad log q_t(x_t)`` (docs/mathematics.md §0)."""
        a = torch.as_tensor(abar, dtype=torch.float64).reshape(-1, 1)
        return -(1 - a).sqrt() * self.score(x, abar)

    def sample(self, n: int, seed=0, return_labels: bool = False):
        """``n`` i.i.d. samples (seeded); optionally with their component labels."""
        g = _gen(seed)
        k = torch.multinomial(self.w, n, replacement=True, generator=g)
        z = torch.randn(n, self.d, generator=g, dtype=torch.float64)
        x = self.mu[k] + (torch.linalg.cholesky(self.cov)[k] @ z[..., None])[..., 0]
        return (x, k) if return_labels else x

    def subset(self, ks) -> "GMM":
        """The mixture of components ``ks`` with renormalised weights (e.g. ``q(. | c)``, retained part)."""
        ks = list(ks)
        return GMM(self.w[ks] / self.w[ks].sum(), self.mu[ks], self.cov[ks])

    def eps_fn(self):
        """``(x, t) -> eps_q`` on the VP schedule of this module (float32 in and out, like a network)."""
        return lambda x, t: self.eps(x.double(), vp_abar(t).double()).to(x.dtype)


# --------------------------------------------------------------------------------------------- grid
@dataclass
class Grid:
    """A square 2-D grid of cell centres: ``points`` (n*n, 2) float64, cell ``area``."""
    lim: float = 6.0
    n: int = 241

    def __post_init__(self):
        self.xs = torch.linspace(-self.lim, self.lim, self.n, dtype=torch.float64)
        X, Y = torch.meshgrid(self.xs, self.xs, indexing="xy")
        self.points = torch.stack([X.reshape(-1), Y.reshape(-1)], -1)
        self.h = float(self.xs[1] - self.xs[0])
        self.area = self.h ** 2

    def image(self, values) -> np.ndarray:
        """Values on ``points`` as an (n, n) image (rows = y)."""
        return np.asarray(values, dtype=float).reshape(self.n, self.n)

    def sample(self, p, n: int, seed=0) -> torch.Tensor:
        """Exact sampler of a grid density ``p`` (cell by mass, then uniform in the cell)."""
        g = _gen(seed)
        idx = torch.multinomial(torch.as_tensor(p, dtype=torch.float64), n, replacement=True, generator=g)
        return self.points[idx] + (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * self.h


def _kl(p, logp, logq, area) -> float:
    """``KL(p || q) = sum p (log p - log q) area`` over the cells where p > 0."""
    m = p > 0
    return float((p[m] * (logp[m] - logq[m])).sum() * area)


# ------------------------------------------------------------------------------------------ problems
class Problem:
    """One constrained-unlearning problem of docs/mathematics.md §2 on a 2-D grid.

    ``kind``: ``"ru"`` (min KL(p||q) s.t. KL(p||q_u^i) >= b_i), ``"fu"`` (min KL(q||p) s.t.
    KL(q_u^i||p) >= b_i) or ``"lu"`` (min KL(p||q) s.t. E_p[q_u^i] <= b_i, i.e. b = eps).
    ``forget``: the m unlearning distributions ``q_u^i`` (GMMs). ``b``: the m thresholds.
    Constraint functions ``g_i`` (positive = violated) follow :mod:`vdu.primal_dual`.
    """

    def __init__(self, kind: str, q: GMM, forget, b, grid: Grid | None = None):
        if kind not in ("ru", "fu", "lu"):
            raise ValueError(f"kind must be 'ru', 'fu' or 'lu', not {kind!r}")
        self.kind, self.q, self.forget = kind, q, list(forget)
        self.m = len(self.forget)
        self.b = np.broadcast_to(np.asarray(b, dtype=float), (self.m,)).copy()
        if self.m == 0 or any(u.d != q.d for u in self.forget):
            raise ValueError("need m >= 1 unlearning distributions of the same dimension as q")
        if q.d != 2:
            raise ValueError("the grid computations are 2-D")
        self.grid = grid or Grid()
        P = self.grid.points
        self.logq = q.log_prob(P).numpy()
        self.logqu = np.stack([u.log_prob(P).numpy() for u in self.forget])
        self.qg, self.qug = np.exp(self.logq), np.exp(self.logqu)
        mass = self.qg.sum() * self.grid.area
        if abs(mass - 1) > 1e-3:
            raise ValueError(f"the grid holds only {mass:.5f} of q's mass: enlarge Grid(lim=...)")

    # -- closed forms ------------------------------------------------------------------------------
    def _lam(self, lam) -> np.ndarray:
        lam = np.asarray(lam, dtype=float).reshape(-1)
        if lam.shape != (self.m,):
            raise ValueError(f"expected {self.m} multipliers, got {lam.shape}")
        if (lam < 0).any():
            raise ValueError(f"multipliers must be >= 0, got {lam}")
        return lam

    def log_unnormalised(self, lam, logq, logqu, qu) -> np.ndarray:
        """Unnormalised log-target at points given ``log q``, ``log q_u`` (m, N) and ``q_u`` (m, N)."""
        lam = self._lam(lam)
        if self.kind == "ru":
            a = targets.ru_alpha(lam)
            return (1 + a.sum()) * logq - a @ logqu                               # q prod (q/q_u)^alpha
        if self.kind == "lu":
            return logq - lam @ qu                                                 # q exp(-sum lambda q_u)
        r = np.exp(logq) - lam @ qu                                               # q - sum lambda q_u
        return np.log(np.maximum(r, 1e-300))

    def target(self, lam) -> tuple[np.ndarray, np.ndarray, float]:
        """Closed-form optimal p_lambda on the grid: (density, log-density, log-normaliser)."""
        lam = self._lam(lam)
        if self.kind == "fu":
            r = self.qg - lam @ self.qug
            if r.min() < -1e-12 * self.qg.max() or lam.sum() >= 1:
                raise ValueError(f"lambda = {lam} is outside the FU dual domain (q - sum lambda q_u < 0)")
        lp = self.log_unnormalised(lam, self.logq, self.logqu, self.qug)
        logZ = float(torch.logsumexp(torch.as_tensor(lp), 0)) + math.log(self.grid.area)
        return np.exp(lp - logZ), lp - logZ, logZ

    def log_target_at(self, x, lam) -> torch.Tensor:
        """``log p_lambda(x)`` at arbitrary points (normaliser from the grid)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        logq = self.q.log_prob(x).numpy()
        logqu = np.stack([u.log_prob(x).numpy() for u in self.forget])
        lp = self.log_unnormalised(lam, logq, logqu, np.exp(logqu))
        return torch.as_tensor(lp - self.target(lam)[2])

    def primal(self, p, logp) -> tuple[float, np.ndarray]:
        """Objective and constraint functions ``g`` (positive = violated) of a grid density."""
        A = self.grid.area
        if self.kind == "ru":
            obj = _kl(p, logp, self.logq, A)
            g = np.array([bi - _kl(p, logp, lu, A) for bi, lu in zip(self.b, self.logqu)])
        elif self.kind == "fu":
            obj = _kl(self.qg, self.logq, logp, A)
            g = np.array([bi - _kl(qu, lu, logp, A) for bi, qu, lu in zip(self.b, self.qug, self.logqu)])
        else:
            obj = _kl(p, logp, self.logq, A)
            g = (self.qug * p).sum(1) * A - self.b
        return obj, g

    def lagrangian(self, p, logp, lam) -> float:
        obj, g = self.primal(p, logp)
        return obj + float(self._lam(lam) @ g)

    def dual(self, lam) -> float:
        """The dual function in closed form (the notebook derives each):
        RU ``-(1 - Lambda) log Z + lambda.b``; LU ``-log Z - lambda.eps``; FU
        ``int q log q - sum lambda_i int q_u^i log q_u^i - int r log r + (1 - Lambda) log(1 - Lambda) + lambda.b``
        with ``r = q - sum lambda_i q_u^i``; ``-inf`` outside the dual domain."""
        lam = self._lam(lam)
        L, A = lam.sum(), self.grid.area
        if self.kind == "ru":
            return -np.inf if L >= 1 else -(1 - L) * self.target(lam)[2] + lam @ self.b
        if self.kind == "lu":
            return -self.target(lam)[2] - lam @ self.b
        r = self.qg - lam @ self.qug
        if r.min() < -1e-12 * self.qg.max() or L >= 1:
            return -np.inf
        r = np.maximum(r, 0)
        xlogx = lambda v, lv: float((v * lv).sum() * A)
        rlogr = float((r[r > 0] * np.log(r[r > 0])).sum() * A)
        return (xlogx(self.qg, self.logq) - sum(l * xlogx(qu, lu) for l, qu, lu in zip(lam, self.qug, self.logqu))
                - rlogr + (1 - L) * math.log(1 - L) + lam @ self.b)

    def dual_grad(self, lam) -> np.ndarray:
        """Danskin: ``grad d(lambda) = g(p_lambda)``."""
        p, lp, _ = self.target(lam)
        return self.primal(p, lp)[1]

    def dual_domain(self, margin: float = 1e-3, lu_cap: float | None = None) -> DualDomain:
        """The problem's dual domain for :func:`vdu.primal_dual.primal_dual`. FU caps: the largest
        ``lambda_i`` with ``q - lambda_i q_u^i >= 0`` on the grid, checked jointly (the box must lie
        inside the domain, which holds when the q_u^i are distinct components of q)."""
        if self.kind == "ru":
            return DualDomain("ru", self.m, margin=margin)
        if self.kind == "lu":
            return DualDomain("lu", self.m, cap=lu_cap)
        caps = (self.qg / self.qug).min(1) * (1 - 1e-9)
        if (self.qg - caps @ self.qug).min() < -1e-12 * self.qg.max():
            raise NotImplementedError("these forget distributions overlap: the FU dual domain is not a box; "
                                      "project onto {q - sum lambda q_u >= 0} yourself")
        return DualDomain("fu", self.m, cap=caps)

    # -- exact feasibility and the exact dual optimum ------------------------------------------------
    def check_feasible(self):
        """Raise :class:`InfeasibleConstraint` when no target can meet the thresholds, by an exact
        test: RU on the grid, ``b_i < max_cell -log(q_u^i(x) area)`` (KL(p||q_u) is convex, so its
        maximum over densities is at a point mass; for m > 1 a shared cell is sufficient, not
        necessary); FU, the optimum is attained only if ``b_i < KL(q_u^i || p_cap)`` at the corner of
        the dual domain (otherwise the infimum needs p -> 0 on part of supp q_u); LU, Slater's
        condition (a density with ``E_p[q_u^i] < eps_i`` for all i) by a linear programme."""
        A = self.grid.area
        if self.kind == "ru":
            bound = -(self.logqu + math.log(A))
            if not ((bound > self.b[:, None]).all(0)).any():
                i = int(np.argmax(self.b - bound.max(1)))
                raise InfeasibleConstraint(f"RU threshold b_{i} = {self.b[i]:.4g} >= the largest KL(p || q_u^{i}) "
                                           f"any density on this grid reaches ({bound[i].max():.4g})", index=i)
        elif self.kind == "fu":
            cap = self.dual_domain().cap
            p, lp, _ = self.target(cap)
            g = self.primal(p, lp)[1]
            if (g >= 0).any():
                i = int(np.argmax(g))
                raise InfeasibleConstraint(f"FU threshold b_{i} = {self.b[i]:.4g} is not attainable: even at the "
                                           f"corner lambda = {np.round(cap, 4)} of the dual domain (the retained-only "
                                           f"target) KL(q_u^{i} || p) = {self.b[i] - g[i]:.4g}", index=i)
        else:
            n = self.qug.shape[1]
            # min t  s.t.  sum_x p(x) q_u^i(x) A - eps_i <= t,  sum p = 1/A, p >= 0
            c = np.r_[np.zeros(n), 1.0]
            A_ub = np.c_[self.qug * A, -np.ones(self.m)]
            res = optimize.linprog(c, A_ub=A_ub, b_ub=self.b, A_eq=np.r_[np.ones(n), 0.0][None] * A, b_eq=[1.0],
                                   bounds=[(0, None)] * n + [(None, None)], method="highs")
            if not res.success or res.fun >= 0:
                raise InfeasibleConstraint(f"LU thresholds eps = {self.b} admit no density with E_p[q_u] < eps "
                                           f"(best max_i E_p[q_u^i] - eps_i = {res.fun:.4g})")

    def solve(self, margin: float = 1e-9) -> dict:
        """Maximise the dual exactly (SLSQP with the Danskin gradient), then report the primal value
        at the Lagrangian minimiser ``p_lambda*``, the duality gap ``P - D`` (an upper bound on the true
        gap once p_lambda* is feasible), the constraint functions and complementary slackness."""
        self.check_feasible()
        m = self.m
        if self.kind == "fu":
            hi = self.dual_domain().cap
        elif self.kind == "ru":
            hi = np.full(m, 1 - margin)
        else:
            hi = np.full(m, None)
        cons = [{"type": "ineq", "fun": lambda l: 1 - margin - l.sum(), "jac": lambda l: -np.ones(m)}] \
            if self.kind == "ru" else []
        f = lambda l: -self.dual(np.maximum(l, 0))
        jac = lambda l: -self.dual_grad(np.maximum(l, 0))
        best = None
        for x0 in (np.zeros(m), np.full(m, 0.5 / m if self.kind != "lu" else 1.0)):
            x0 = np.minimum(x0, [h if h is not None else np.inf for h in hi]) * 0.5 if self.kind == "fu" else x0
            r = optimize.minimize(f, x0, jac=jac, method="SLSQP", bounds=list(zip(np.zeros(m), hi)),
                                  constraints=cons, options={"ftol": 1e-15, "maxiter": 500})
            if best is None or r.fun < best.fun:
                best = r
        lam = np.maximum(best.x, 0)
        D = self.dual(lam)
        p, lp, _ = self.target(lam)
        P, g = self.primal(p, lp)
        return {"kind": self.kind, "lam": lam, "dual": D, "primal": P, "gap": P - D, "violations": g,
                "max_violation": float(max(g.max(), 0)), "complementary_slackness": lam * g,
                "alpha": targets.ru_alpha(lam) if self.kind == "ru" else None, "target": p}

    # -- pretrained-model references and learned-model constraint estimates ---------------------------
    def reference(self) -> np.ndarray:
        """Each constraint's quantity at p = q: KL(q || q_u^i) (RU), KL(q_u^i || q) (FU), E_q[q_u^i] (LU)."""
        return self.b - self.primal(self.qg, self.logq)[1] if self.kind != "lu" else \
            self.primal(self.qg, self.logq)[1] + self.b


# ------------------------------------------------------------------------ continuous-time VP diffusion
BETA_MIN, BETA_MAX, T_EPS = 0.1, 20.0, 1e-3


def vp_beta(t):
    return BETA_MIN + t * (BETA_MAX - BETA_MIN)


def vp_abar(t):
    """``abar(t) = exp(-int_0^t beta)``: DDPM's linear betas 1e-4..0.02 over T = 1000 as T -> inf."""
    return torch.exp(-(BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t ** 2))


class EpsMLP(nn.Module):
    """Small MLP noise predictor ``eps_theta(x_t, t)`` (sinusoidal time features)."""

    def __init__(self, d: int = 2, width: int = 128, depth: int = 3, nfreq: int = 16):
        super().__init__()
        self.register_buffer("freq", torch.exp(torch.linspace(0, math.log(1000.0), nfreq)))
        layers, i = [], d + 2 * nfreq
        for _ in range(depth):
            layers += [nn.Linear(i, width), nn.SiLU()]
            i = width
        self.net = nn.Sequential(*layers, nn.Linear(width, d))

    def forward(self, x, t):
        a = t.reshape(-1, 1).to(x.dtype) * self.freq
        return self.net(torch.cat([x, a.sin(), a.cos()], -1))


def denoise_loss(net, x0, gen=None) -> torch.Tensor:
    """Per-sample ``||eps - eps_theta(x_t, t)||^2``, ``t ~ U(T_EPS, 1)`` (docs/mathematics.md §0, continuous t)."""
    x0 = x0.float()
    t = T_EPS + (1 - T_EPS) * torch.rand(len(x0), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = vp_abar(t)[:, None]
    return ((eps - net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t)) ** 2).sum(-1)


def pretrain(net, q: GMM, steps: int = 4000, batch: int = 1024, lr: float = 2e-3, seed: int = 0,
             progress: bool = True) -> list[float]:
    """Train ``net`` on samples of ``q`` (fresh each step, seeded); cosine LR; returns the losses."""
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    g = _gen(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.05)
    losses = []
    for _ in tqdm(range(steps), desc="pretrain", disable=not progress, mininterval=1.0):
        loss = denoise_loss(net, q.sample(batch, g), g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _drift_div(eps_fn, x, t):
    """Probability-flow drift ``f = -beta/2 (x - eps/sigma)`` and its exact divergence (autograd)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        tt = torch.full((len(x),), float(t))
        e = eps_fn(x, tt)
        div = sum(torch.autograd.grad(e[:, i].sum(), x, retain_graph=i < x.shape[1] - 1)[0][:, i]
                  for i in range(x.shape[1]))
    s = math.sqrt(1 - float(vp_abar(torch.tensor(t))))
    b = float(vp_beta(torch.tensor(t)))
    return (-0.5 * b * (x - e / s)).detach(), (-0.5 * b * (x.shape[1] - div / s)).detach()


def _ode(eps_fn, x, forward: bool, steps: int):
    ts = T_EPS + (1 - T_EPS) * torch.linspace(0, 1, steps + 1).double() ** 2   # dense near t = 0
    ts = ts if forward else ts.flip(0)
    x, acc = x.float(), torch.zeros(len(x), dtype=torch.float64)
    for t0, t1 in zip(ts[:-1].tolist(), ts[1:].tolist()):                      # Heun
        f0, d0 = _drift_div(eps_fn, x, t0)
        h = t1 - t0
        f1, d1 = _drift_div(eps_fn, x + h * f0, t1)
        x = x + 0.5 * h * (f0 + f1)
        acc += 0.5 * h * (d0 + d1).double()
    return x, acc


def _log_normal(z):
    return -0.5 * (z.double() ** 2).sum(-1) - 0.5 * z.shape[1] * LOG2PI


@torch.no_grad()
def ode_log_prob(eps_fn, x, steps: int = 60, chunk: int = 8192) -> torch.Tensor:
    """Exact log-density of the probability-flow ODE model at ``x`` (instantaneous change of
    variables, prior N(0, I) at t = 1): ``log p_0(x) = log N(x_1) + int_0^1 div f dt``."""
    out = []
    for xc in torch.as_tensor(x).split(chunk):
        x1, acc = _ode(eps_fn, xc, True, steps)
        out.append(_log_normal(x1) + acc)
    return torch.cat(out)


@torch.no_grad()
def ode_sample(eps_fn, n: int, seed=0, steps: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of the probability-flow ODE model and their exact log-densities (seeded)."""
    z = torch.randn(n, 2, generator=_gen(seed))
    x0, acc = _ode(eps_fn, z, False, steps)
    return x0.double(), _log_normal(z) - acc       # acc = -int_eps^1 div f (integrated downwards)


# ------------------------------------------------------------------------------- learned unlearning
def learned_values(problem: Problem, eps_fn, lam=None, n: int = 2000, seed: int = 0, steps: int = 60) -> dict:
    """Monte-Carlo estimates for a learned model (exact ODE log-likelihoods): objective, constraint
    functions g, and (given ``lam``) ``kl_to_target = KL(p_lambda || p_theta)``."""
    g_ = _gen(seed)
    out = {}
    if problem.kind in ("ru", "lu"):
        x, lp = ode_sample(eps_fn, n, g_, steps)
        logq = problem.q.log_prob(x)
        out["objective"] = float((lp - logq).mean())                                  # KL(p_theta || q)
        if problem.kind == "ru":
            out["violations"] = np.array([b - float((lp - u.log_prob(x)).mean()) for b, u in zip(problem.b, problem.forget)])
        else:
            out["violations"] = np.array([float(u.prob(x).mean()) - b for b, u in zip(problem.b, problem.forget)])
    else:
        xq = problem.q.sample(n, g_)
        out["objective"] = float((problem.q.log_prob(xq) - ode_log_prob(eps_fn, xq, steps)).mean())   # KL(q || p)
        out["violations"] = np.array([b - float((u.log_prob(xu) - ode_log_prob(eps_fn, xu, steps)).mean())
                                      for b, u in zip(problem.b, problem.forget) for xu in [u.sample(n, g_)]])
    if lam is not None:
        p, _, _ = problem.target(lam)
        xs = problem.grid.sample(p, n, g_)
        out["kl_to_target"] = float((problem.log_target_at(xs, lam) - ode_log_prob(eps_fn, xs, steps)).mean())
    return out


def unlearn(problem: Problem, net: nn.Module, *, steps: int = 2000, dual_every: int = 100, dual_lr=0.5,
            lr: float = 1e-3, batch: int = 1024, n_eval: int = 2000, ode_steps: int = 40, seed: int = 0,
            patience: int = 10, progress: bool = True):
    """The primal-dual algorithm (docs/mathematics.md §2) for a learned 2-D diffusion model, in place on ``net``.

    Primal step: RU / LU — denoising on samples of the Lagrangian minimiser ``p_lambda`` (the closed
    form, drawn exactly from the grid), so the fitted model is the diffusion of ``p_lambda`` itself;
    FU — the retain-minus-forget loss with dual weights, :func:`vdu.targets.fu_loss` on batches of q
    and of each q_u^i. Dual step every ``dual_every`` primal steps on the constraint functions of the
    *learned* model (:func:`learned_values`, exact ODE likelihoods). Checks feasibility exactly first
    (:meth:`Problem.check_feasible`); the engine's pinning test covers the rest. Returns the PDResult."""
    problem.check_feasible()
    g = _gen(seed)
    cache = {}

    def lag(lam):
        if problem.kind == "fu":
            lq = denoise_loss(net, problem.q.sample(batch, g), g)
            lu = [denoise_loss(net, u.sample(batch, g), g) for u in problem.forget]
            return {"loss": targets.fu_loss(lq, lu, lam)}
        key = tuple(np.round(lam, 12))
        if key not in cache:
            cache.clear()
            cache[key] = problem.target(lam)[0]
        return {"loss": denoise_loss(net, problem.grid.sample(cache[key], batch, g), g).mean()}

    ev = lambda step: learned_values(problem, net, n=n_eval, seed=seed * 100003 + step, steps=ode_steps)
    return primal_dual(net.parameters(), lag, problem.dual_domain(), steps=steps, dual_every=dual_every,
                       dual_lr=dual_lr, lr=lr, evaluate=ev, patience=patience, seed=seed, progress=progress,
                       desc=f"{problem.kind.upper()} primal-dual")


# -------------------------------------------------------------------------------------- estimators
def mmd2(x, y, bandwidths=(0.25, 0.5, 1.0, 2.0), max_n: int = 4000) -> float:
    """Unbiased MMD^2 between sample sets (sum of Gaussian kernels with the given bandwidths)."""
    x, y = torch.as_tensor(x, dtype=torch.float64)[:max_n], torch.as_tensor(y, dtype=torch.float64)[:max_n]
    k = lambda a, b: sum(torch.exp(-torch.cdist(a, b) ** 2 / (2 * h * h)) for h in bandwidths)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    return float((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
                 - 2 * kxy.mean())


def kl_knn(x, y, k: int = 5) -> float:
    """kNN estimate of ``KL(P || Q)`` from samples x ~ P, y ~ Q (Wang, Kulkarni & Verdu 2009)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n, m, d = len(x), len(y), x.shape[1]
    rho = cKDTree(x).query(x, k + 1)[0][:, -1]
    nu = cKDTree(y).query(x, k)[0]
    nu = nu[:, -1] if nu.ndim > 1 else nu
    return float(d * np.mean(np.log(nu / rho)) + math.log(m / (n - 1)))


def mode_stats(q: GMM, x=None, p=None, grid: Grid | None = None) -> dict:
    """Mass, mean and mean shift (from q's component mean) of each of q's modes under a distribution
    given by samples ``x`` or a grid density ``p``: points go to the component of largest q-responsibility."""
    if x is not None:
        pts = torch.as_tensor(x, dtype=torch.float64)
        wts = torch.full((len(pts),), 1.0 / len(pts), dtype=torch.float64)
    else:
        pts, wts = grid.points, torch.as_tensor(p, dtype=torch.float64) * grid.area
    lab = q.responsibilities(pts).argmax(1)
    mass, shift, means = np.zeros(q.K), np.full(q.K, np.nan), np.full((q.K, q.d), np.nan)
    for k in range(q.K):
        s = lab == k
        mass[k] = float(wts[s].sum())
        if mass[k] > 0:
            mean = (wts[s, None] * pts[s]).sum(0) / wts[s].sum()
            shift[k], means[k] = float((mean - q.mu[k]).norm()), mean.numpy()
    return {"mass": mass, "shift": shift, "mean": means}
