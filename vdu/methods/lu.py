"""LU, likelihood-constrained concept unlearning (docs/mathematics.md §2.7), for class-conditional models.

With ``q`` the frozen pretrained model's unconditional branch and ``p = p_theta(. | c)`` the model under
the erased prompt c, LU bounds how likely the concept stays under ``p``:

    min_p KL(p || q)   s.t.   E_{x~p}[ w_c(x) ] <= eps,      p* ∝ q exp(-lambda w_c(x)).

Here ``w_c(x) = q(c | x)`` is the concept's likelihood relative to the pretrained model
(``q_u / q = q(c | x) / q(c)``, bounded in [0, 1]; ours): the constraint reads "at most a share eps of
what the prompt yields is the concept", in the same units as the forget rate. Its score is
``s* = s_q - lambda grad w_c = s_q - lambda w_c grad log q(c | x)``, and ``grad log q(c | x)`` is the
pretrained model's own class direction ``s_q(x | c) - s_q(x)``; in noise form

    eps*(x_t) = eps_q(x_t, null) + lambda w_c(x_t) (eps_q(x_t, null) - eps_q(x_t, c)),

RU's and ESD's negative guidance with a guidance scale ``lambda w_c(x_t)`` that is large only where the
sample still looks like the concept: LU pushes where the concept is, and leaves the rest of the prompt's
samples at the unconditional model.

**Estimators (ours).** ``w_c(x_t)`` is a classifier's probability of c on the Tweedie estimate
``x0_hat = (x_t - sqrt(1 - abar_t) eps_q(x_t, null)) / sqrt(abar_t)`` (``classifier``: an evaluator
folder written by ``python -m vdu evaluator``; use another one than the evaluator that measures the
result). As for classifier-free guidance, the noised marginals of ``p*`` are only approximately those
of the guided prediction; the target is exact at t = 0. The constraint itself is measured where it is
defined, at t = 0: every ``dual_every`` steps the model draws ``dual_samples`` full DDIM samples under c
and ``E_p[w_c]`` is their mean classifier probability. The multiplier follows projected dual ascent
(``vdu.primal_dual.DualAscent``) on ``lambda >= 0``, capped at ``lam_max``: a multiplier at the cap while
its constraint stays violated for ``patience`` dual steps raises ``InfeasibleConstraint`` (the loop stops
the run as ``infeasible``). Several prompts (``concepts=(c1, c2)``) are separate problems, one multiplier
each, as in RU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..diffusion import sample
from ..primal_dual import DualAscent, DualDomain, InfeasibleConstraint
from .base import check_fraction, check_nonneg
from .esd import ESD, SOURCES, ESDConfig
from .ru import concept_list


@dataclass
class LUConfig:
    eps: float = 0.05            # threshold: E_{x ~ p_theta(.|c)}[q(c | x)] <= eps (the share of the prompt's samples that stay the concept)
    classifier: str | None = None  # evaluator folder whose probability of c is w_c (required; not the one that measures)
    concepts: tuple | None = None  # prompts to erase, one multiplier each (None: the forget class)
    lam0: float = 1.0            # initial multiplier (1: ESD's public eta = 1 where the concept is certain)
    dual_lr: float = 4.0         # step of the projected dual ascent on lambda, per unit of violation
    dual_every: int = 10         # primal steps per dual step
    dual_samples: int = 32       # full DDIM samples under each prompt that measure E_p[w_c] on a dual step
    lam_max: float = 20.0        # cap on lambda (the largest guidance where w_c = 1)
    patience: int = 10           # dual steps at lam_max with the constraint violated before "infeasible"
    xt_source: str = "sample"    # x_t: "sample" (partial DDIM sampling under c, ESD's) or "forget" (noised D_f)
    sample_steps: int = 10       # DDIM steps of the partial sampling and of the dual step's samples
    dual_seed: int = 0           # seed bank of the dual step's samples (the same noise at every dual step)


class LU(ESD):
    name = "lu"
    Config = LUConfig
    needs = ("forget", "teacher", "conditional")
    null_strength = {}           # lambda = 0 still moves c to the unconditional branch

    def __init__(self, model, data, config, scheduler, null_class, posterior=None):
        c = config
        if c.xt_source not in SOURCES:
            raise ValueError(f"xt_source must be one of {SOURCES}, got {c.xt_source!r}")
        check_fraction("eps", c.eps)
        check_nonneg("dual_lr", c.dual_lr)
        if not (isinstance(c.lam_max, (int, float)) and np.isfinite(c.lam_max) and c.lam_max > 0):
            raise ValueError(f"lam_max must be a finite number > 0, got {c.lam_max!r}")
        if not (isinstance(c.lam0, (int, float)) and 0.0 <= c.lam0 <= c.lam_max):
            raise ValueError(f"lam0 must be in [0, lam_max], got {c.lam0!r}")
        for k in ("dual_every", "patience", "dual_samples"):
            v = getattr(c, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
        super().__init__(model, data, ESDConfig(eta=0.0, xt_source=c.xt_source, sample_steps=c.sample_steps),
                         scheduler, null_class, posterior)
        self.config = c
        self.classifier = _classifier(c.classifier, model)
        self.concepts = concept_list(c.concepts, data, null_class)
        if self.classifier.config.get("num_classes", null_class) < max(self.concepts) + 1:
            raise ValueError(f"the classifier knows {self.classifier.config.get('num_classes')} classes; "
                             f"concepts {self.concepts} need more")
        self.duals = [DualAscent(DualDomain("lu", 1, cap=[c.lam_max]), c.dual_lr, 1, [float(c.lam0)], c.patience)
                      for _ in self.concepts]
        self.abar = scheduler.alphas_cumprod

    def lams(self) -> list[float]:
        return [float(d.lam[0]) for d in self.duals]

    @torch.no_grad()
    def weight(self, x0, k) -> torch.Tensor:
        """w_k: the classifier's probability of class k per image (x0 in [-1, 1])."""
        logits = self.classifier(x0.clamp(-1, 1).to(next(self.classifier.parameters()).device).float())
        return logits.softmax(1)[:, k].to(x0.device)

    def loss(self, model, batch):
        g, shape = batch.generator, batch.forget.shape
        total, out = 0.0, {}
        for k, lam in zip(self.concepts, self.lams()):
            c = torch.full((shape[0],), k, device=batch.forget.device)
            xt, t = self._xt(model, c, batch.forget, g)
            e_c, e_u = self._branches(xt, t, c)
            with torch.no_grad():
                a = self.abar.to(xt.device)[t].float().view(-1, 1, 1, 1)
                w = self.weight((xt - (1 - a).sqrt() * e_u) / a.sqrt(), k).view(-1, 1, 1, 1)
                target = e_u + lam * w * (e_u - e_c)
            pred = model(xt, t, class_labels=c).sample.float()
            total = total + (pred - target).pow(2).mean()
            out[f"w_{k}"] = w.mean()
            out[f"lam_{k}"] = lam
        with torch.no_grad():
            fl, _ = self.denoising(model, batch.forget, batch.forget_labels, g)
        return {"loss": total, "forget_loss": fl.mean(), **out}

    @torch.no_grad()
    def concept_rate(self, model) -> np.ndarray:
        """E_{x ~ p_theta(.|c)}[w_c(x)] per concept on ``dual_samples`` full DDIM samples (the same noise each time)."""
        c = self.config
        return np.array([float(self.weight(sample(model, self.scheduler, c.dual_samples, seed=c.dual_seed + k,
                                                  steps=c.sample_steps, class_labels=k, progress=False), k).mean())
                         for k in self.concepts])

    def after_step(self, model, step, out):
        if step % self.config.dual_every:
            return None
        rate = self.concept_rate(model)
        viol = rate - self.config.eps
        for i, d in enumerate(self.duals):
            try:
                d.step(step, violations=viol[i:i + 1])
            except InfeasibleConstraint as e:
                raise InfeasibleConstraint(f"concept {self.concepts[i]}: {e}", index=i,
                                           lam=np.array(self.lams()), violation=viol) from None
        return {"step": step, "lam": self.lams(), "rate": rate.tolist(), "violations": viol.tolist(),
                "concepts": self.concepts}


def _classifier(spec, model):
    import os

    from ..evaluator import load_evaluator
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError("method 'lu' needs a classifier of the concept: classifier='<evaluator folder>' "
                         "(written by `python -m vdu evaluator`), ideally not the evaluator that measures the result")
    clf = load_evaluator(spec).to(next(model.parameters()).device).eval().requires_grad_(False)
    cfg = model.config
    if clf.config.get("in_channels", cfg.in_channels) != cfg.in_channels or \
            clf.config.get("image_size", cfg.sample_size) != cfg.sample_size:
        raise ValueError(f"the classifier takes {clf.config.get('in_channels')} x {clf.config.get('image_size')} px "
                         f"images; the model makes {cfg.in_channels} x {cfg.sample_size} px")
    return clf
