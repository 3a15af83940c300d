"""RU, reverse-KL constrained concept unlearning (docs/mathematics.md §2), for class-conditional models.

The concept is a prompt c; the null class is the unconditional branch. For the model's distribution
under the prompt, ``p = p_theta(. | c)``, with ``q = q(. | null)`` and ``q_u = q(. | c)`` the frozen
pretrained model's branches:

    min_p KL(p || q)   s.t.   KL(p || q_u) >= b

Strong duality gives the optimum ``p* ∝ q (q / q_u)^alpha``, ``alpha = lambda / (1 - lambda)``, whose
noise prediction is the negative-guidance target

    eps*(x_t) = eps_q(x_t, null) + alpha (eps_q(x_t, null) - eps_q(x_t, c)),

ESD's target with ``eta = alpha``. RU is therefore ESD's primal step with the guidance scale set by
the multiplier of the constraint (projected dual ascent, ``vdu.primal_dual.DualAscent``, started at
the closed form's ``alpha = sqrt(kl_min) - 1``) instead of by hand: the threshold b says *how far* from the concept the prompt must move, the dual finds the
smallest guidance that gets there.

**Constraint estimate.** The pathwise reverse KL of docs/mathematics.md §2 with C_t = 1 on the model's own
x_t (ESD's partial DDIM sampling under c with the model being trained),
``K(theta) = E ||eps_theta(x_t, c) - eps_q(x_t, c)||^2``, in units of the pretrained *concept gap*
``D0 = E ||eps_q(x_t, c) - eps_q(x_t, null)||^2`` on the same x_t, so ``b = kl_min * D0``. At the
target ``eps* - eps_q(c) = (1 + alpha)(eps_q(null) - eps_q(c))`` pointwise, so ``K / D0 = (1 + alpha)^2``
exactly, whatever the noise level of the batch (the gap itself varies by orders of magnitude over t,
which is why the estimate is self-normalised): ``kl_min = (1 + eta)^2`` corresponds to ESD with
guidance eta (``kl_min = 4`` to ESD's public eta = 1), and the dual finds the smallest guidance that
holds the constraint on the model's own samples.

**Several concepts** (``concepts=(c1, c2)``): each prompt is its own problem with its own multiplier
(every ``lambda_i < 1``); the loss sums the prompts' terms. **Infeasible thresholds**: alpha is capped
at ``alpha_max`` (the dual domain's margin, ``lambda <= alpha_max / (1 + alpha_max)``); a multiplier
that sits at the cap while its constraint stays violated for ``patience`` dual steps raises
``InfeasibleConstraint`` and the loop stops the run as ``infeasible`` (the dual variable ran away).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..primal_dual import DualAscent, DualDomain, InfeasibleConstraint
from .base import check_nonneg
from .esd import ESD, SOURCES, ESDConfig


@dataclass
class RUConfig:
    kl_min: float = 4.0          # b in units of the concept gap D0: KL(p_theta(.|c) || q(.|c)) >= kl_min * D0 ((1 + eta)^2: ESD's eta)
    concepts: tuple | None = None  # prompts to erase, one multiplier each (None: the forget class)
    dual_lr: float = 0.02        # step of the projected dual ascent on lambda, per unit of kl_min
    dual_every: int = 10         # primal steps per dual step (K and D0 are summed over them)
    lam0: float | None = None    # initial multiplier (None: the closed form's, alpha = sqrt(kl_min) - 1 if >= 0, else 0)
    alpha_max: float = 10.0      # largest guidance alpha the dual may reach (the RU domain's margin)
    patience: int = 20           # dual steps at alpha_max with the constraint violated before "infeasible"
    xt_source: str = "sample"    # x_t: "sample" (partial DDIM sampling under c, ESD's) or "forget" (noised D_f)
    sample_steps: int = 10       # DDIM steps of the partial sampling


class RU(ESD):
    name = "ru"
    Config = RUConfig
    needs = ("forget", "teacher", "conditional")
    null_strength = {}           # lambda = 0 still moves c to the unconditional branch (alpha = 0)

    def __init__(self, model, data, config, scheduler, null_class, posterior=None):
        c = config
        if c.xt_source not in SOURCES:
            raise ValueError(f"xt_source must be one of {SOURCES}, got {c.xt_source!r}")
        check_nonneg("kl_min", c.kl_min)
        check_nonneg("dual_lr", c.dual_lr)
        if not (isinstance(c.alpha_max, (int, float)) and np.isfinite(c.alpha_max) and c.alpha_max > 0):
            raise ValueError(f"alpha_max must be a finite number > 0, got {c.alpha_max!r}")
        lam_max = c.alpha_max / (1 + c.alpha_max)
        if c.lam0 is None:      # a perfectly fitted model meets K / D0 = (1 + alpha)^2 = kl_min
            a0 = max(float(np.sqrt(c.kl_min)) - 1.0, 0.0)
            lam0 = min(a0 / (1 + a0), lam_max)
        elif isinstance(c.lam0, (int, float)) and 0.0 <= c.lam0 <= lam_max:
            lam0 = float(c.lam0)
        else:
            raise ValueError(f"lam0 must be None or in [0, alpha_max / (1 + alpha_max)], got {c.lam0!r}")
        for k in ("dual_every", "patience"):
            v = getattr(c, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
        # ESD's machinery (frozen teacher, partial DDIM sampling); its eta is set every step from lambda
        super().__init__(model, data, ESDConfig(eta=0.0, xt_source=c.xt_source, sample_steps=c.sample_steps),
                         scheduler, null_class, posterior)
        self.config = c
        self.concepts = concept_list(c.concepts, data, null_class)
        margin = 1.0 / (1.0 + c.alpha_max)
        # every=1: the dual step is taken by after_step every dual_every steps, on the window's ratio of sums
        self.duals = [DualAscent(DualDomain("ru", 1, margin=margin), c.dual_lr, 1, [lam0], c.patience)
                      for _ in self.concepts]
        self._num, self._den = 0.0, 0.0

    def alphas(self) -> list[float]:
        return [float(d.lam[0] / (1.0 - d.lam[0])) for d in self.duals]

    def loss(self, model, batch):
        g, shape = batch.generator, batch.forget.shape
        total, num, den = 0.0, [], []
        for k, alpha in zip(self.concepts, self.alphas()):
            c = torch.full((shape[0],), k, device=batch.forget.device)
            xt, t = self._xt(model, c, batch.forget, g)
            e_c, e_u = self._branches(xt, t, c)
            target = e_u + alpha * (e_u - e_c)
            pred = model(xt, t, class_labels=c).sample.float()
            total = total + (pred - target).pow(2).mean()
            num.append((pred.detach() - e_c).pow(2).mean())      # K(theta) on this batch's x_t
            den.append((e_u - e_c).pow(2).mean())                # D0 on the same x_t
        with torch.no_grad():
            fl, _ = self.denoising(model, batch.forget, batch.forget_labels, g)
        out = {"loss": total, "forget_loss": fl.mean(), "_num": torch.stack(num), "_den": torch.stack(den)}
        for i, (k, a) in enumerate(zip(self.concepts, self.alphas())):
            out[f"alpha_{k}"] = a
        return out

    def after_step(self, model, step, out):
        # K / D0 as a ratio of sums over the dual window: both are dominated by the noise levels where
        # the prompt matters, so the estimate is stable where a per-batch ratio (tiny D0 at high t) is not
        self._num = self._num + out["_num"].double().cpu()
        self._den = self._den + out["_den"].double().cpu()
        if step % self.config.dual_every:
            return None
        ratio = (self._num / self._den.clamp_min(1e-30)).numpy()
        self._num, self._den = 0.0, 0.0
        viol = self.config.kl_min - ratio
        for i, d in enumerate(self.duals):
            try:
                d.step(step, violations=viol[i:i + 1])
            except InfeasibleConstraint as e:
                raise InfeasibleConstraint(f"concept {self.concepts[i]}: {e}", index=i, lam=self._lams(),
                                           violation=viol) from None
        return {"step": step, "lam": self._lams().tolist(), "alpha": self.alphas(), "kl": ratio.tolist(),
                "violations": viol.tolist(), "concepts": self.concepts}

    def _lams(self) -> np.ndarray:
        return np.array([float(d.lam[0]) for d in self.duals])


def concept_list(concepts, data, null_class) -> list[int]:
    """The prompts to erase: ``concepts`` (distinct classes of the model) or, if None, the forget class."""
    ks = tuple(concepts) if concepts is not None else (data.forget_class,)
    if not ks or len(set(ks)) != len(ks):
        raise ValueError(f"concepts must be distinct classes, got {concepts!r}")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < null_class:
            raise ValueError(f"concept {k!r} is not a class of this model (0..{null_class - 1})")
    return [int(k) for k in ks]
