"""FU, forward-KL constrained data unlearning (docs/mathematics.md §2, eq. 2.4), with retain data.

The pretrained model q was trained on a mixture in which the forget data (here split into groups
``i = 1..m``, each of mass ``w_i``) had total mass ``w``. FU stays close to q in forward KL while every
group is pushed at least ``b_i`` away:

    min_p KL(q || p)   s.t.   KL(q_u^i || p) >= b_i .

With q = (1 - w) q_r + sum_i w_i q_u^i, the Lagrangian in denoising-loss form (forward KL to data is
the denoising bound, eq. 0.4) is, divided by (1 - w),

    L(theta, lambda) = E_{D_r} l_theta + sum_i (w_i - lambda_i) / (1 - w) * E_{D_f^i} l_theta ,

and its optimum is ``p* = (q - sum_i lambda_i q_u^i) / (1 - Lambda)``. The dual domain
``q - sum_i lambda_i q_u^i >= 0`` is the box ``0 <= lambda_i <= w_i``: at ``lambda = w`` the target is
the model retrained without the forget data, and no FU solution goes further. A threshold that needs
more than retraining pins its multiplier at ``w_i`` and the run stops as infeasible; ``lam_max``
(a multiple of w_i) may widen the box beyond the dual domain, which turns the forget term into
gradient ascent (the NegGrad / SISS regime) and is reported as such in the log.

**Constraint estimate** (paired, per group): ``l_theta / l_q`` summed over the dual window, where both
losses are taken on the same x_t and eps of the group's forget images (the frozen pretrained copy gives
``l_q``); ``b_i`` is a ratio ``forget_ratio`` (>= 1) of the pretrained loss, as for VDU's constraint.
Groups are ``index % groups`` of the forget set, so ``groups = |D_f|`` gives one multiplier per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..diffusion import forward_noise
from ..primal_dual import DualAscent, DualDomain, InfeasibleConstraint
from .base import Method, processes, sum_over_processes


@dataclass
class FUConfig:
    forget_ratio: float = 1.5    # b: each group's denoising loss must reach this multiple of the pretrained model's
    forget_mass: float = 0.05    # w: share of the forget data in the pretrained model's training mixture
    groups: int = 1              # multipliers: forget image k belongs to group k % groups (|D_f|: one per image)
    dual_lr: float = 0.01        # step of the projected dual ascent on lambda, per unit of the ratio
    dual_every: int = 5          # primal steps per dual step (the paired ratio is summed over them)
    lam_max: float = 1.0         # box of lambda_i as a multiple of w_i (1: FU's dual domain; > 1 leaves it)
    lam0: float | None = None    # initial lambda_i / w_i; None: 0, or lam_max when dual_lr is 0 (a fixed weight there)
    patience: int = 20           # dual steps at the box's edge with the constraint violated before "infeasible"


class FU(Method):
    name = "fu"
    Config = FUConfig
    needs = ("forget", "retain", "teacher")
    null_strength = {}           # lambda = w = 0 is fine-tuning on D_r, which still moves the weights

    def __init__(self, model, data, config, scheduler, null_class, posterior=None):
        super().__init__(model, data, config, scheduler, null_class, posterior)
        c = config
        if not (isinstance(c.forget_mass, (int, float)) and 0.0 <= c.forget_mass < 1.0):
            raise ValueError(f"forget_mass must be in [0, 1), got {c.forget_mass!r}")
        if not (isinstance(c.forget_ratio, (int, float)) and np.isfinite(c.forget_ratio) and c.forget_ratio > 0):
            raise ValueError(f"forget_ratio must be a finite number > 0, got {c.forget_ratio!r}")
        if not (isinstance(c.lam_max, (int, float)) and np.isfinite(c.lam_max) and c.lam_max >= 0):
            raise ValueError(f"lam_max must be a finite number >= 0, got {c.lam_max!r}")
        if not (isinstance(c.dual_lr, (int, float)) and c.dual_lr >= 0):
            raise ValueError(f"dual_lr must be >= 0, got {c.dual_lr!r}")
        for k in ("groups", "dual_every", "patience"):
            v = getattr(c, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
        if c.groups > len(data.forget):
            raise ValueError(f"groups ({c.groups}) cannot exceed the {len(data.forget)} forget images")
        self.m = c.groups
        self.w = np.full(self.m, c.forget_mass / self.m)
        lam0 = (c.lam_max if c.dual_lr == 0 else 0.0) if c.lam0 is None else c.lam0
        if isinstance(lam0, bool) or not (isinstance(lam0, (int, float)) and 0.0 <= lam0 <= c.lam_max):
            raise ValueError(f"lam0 must be in [0, lam_max = {c.lam_max}], got {c.lam0!r}")
        self.dual = DualAscent(DualDomain("fu", self.m, cap=c.lam_max * self.w), c.dual_lr, 1, lam0 * self.w,
                               c.patience)
        self._num, self._den = np.zeros(self.m), np.zeros(self.m)

    @classmethod
    def accumulates(cls, config):
        return False                              # per-group means and sums for the duals, not batch means

    def loss(self, model, batch):
        c, g = self.config, batch.generator
        if batch.forget_index is None:
            raise ValueError("method 'fu' needs the forget images' indices (the loop passes them)")
        group = (batch.forget_index % self.m).to(batch.forget.device)
        xt, t, eps = forward_noise(self.scheduler, batch.forget, g)
        pred = model(xt, t, class_labels=batch.forget_labels).sample.float()
        lf = (pred - eps).pow(2).flatten(1).mean(1)                               # per forget image
        with torch.no_grad():
            lq = (self.teacher(xt, t, class_labels=batch.forget_labels).sample.float() - eps).pow(2).flatten(1).mean(1)
        lr_, _ = self.denoising(model, batch.retain, batch.retain_labels, g)
        coef = torch.as_tensor((self.w - self.dual.lam) / (1.0 - c.forget_mass), dtype=lf.dtype, device=lf.device)
        onehot = torch.nn.functional.one_hot(group, self.m).to(lf.dtype)          # (b, m)
        # E_{D_f^i} l_theta on this batch; with k processes, each holds k x (its share of the group's sum) / (the
        # group's count over all processes), so that the average over the processes is the whole batch's mean
        k = processes()
        n_g = onehot.sum(0) if k == 1 else sum_over_processes(onehot.sum(0))
        mean_g = k * (onehot * lf[:, None]).sum(0) / n_g.clamp_min(1)
        loss = lr_.mean() + (coef * mean_g).sum()
        return {"loss": loss, "retain_loss": lr_.mean().detach(), "forget_loss": lf.mean().detach(),
                "_num": (onehot * lf.detach()[:, None]).sum(0), "_den": (onehot * lq[:, None]).sum(0)}

    def after_step(self, model, step, out):
        self._num += out["_num"].double().cpu().numpy()
        self._den += out["_den"].double().cpu().numpy()
        if step % self.config.dual_every:
            return None
        seen = self._den > 0
        ratio = np.where(seen, self._num / np.where(seen, self._den, 1.0), np.nan)
        viol = np.where(seen, self.config.forget_ratio - ratio, 0.0)   # unseen groups: no evidence, no move
        self._num[:], self._den[:] = 0.0, 0.0
        try:
            rec = self.dual.step(step, violations=viol)
        except InfeasibleConstraint as e:
            raise InfeasibleConstraint(f"forget group {e.index} needs more than FU's dual domain allows "
                                       f"(lambda_{e.index} <= {self.config.lam_max:g} w_i): {e}", index=e.index,
                                       lam=self.dual.lam.copy(), violation=viol) from None
        return {**rec, "ratio": [None if np.isnan(r) else float(r) for r in ratio],
                "lam_over_w": (self.dual.lam / self.w).tolist() if self.w[0] > 0 else None}
