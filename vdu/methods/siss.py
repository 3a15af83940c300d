"""SISS, subtracted importance-sampled scores (Alberti et al. 2025), for data unlearning with retain data.

The objective is ``L_r - s * L_f`` (denoising loss on D_r minus that on D_f), estimated with *one*
forward pass: x_t is drawn from the defensive mixture ``(1 - lambda) q(x_t | x_r) + lambda q(x_t | x_f)``
(a retain and a forget image per slot, the same eps) and each term is importance-weighted::

    L_r ~ w_r ||eps_theta(x_t) - (x_t - sqrt(abar_t) x_r) / sqrt(1 - abar_t)||^2,   w_r = q(x_t|x_r) / q_mix(x_t)
    L_f ~ w_f ||eps_theta(x_t) - (x_t - sqrt(abar_t) x_f) / sqrt(1 - abar_t)||^2,   w_f = q(x_t|x_f) / q_mix(x_t)

with ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` computed in log space. The forget term's
gradient is rescaled to a fixed norm (``forget_norm``, public setting 5) every step, so the subtracted
term cannot run away; the loop then clips the whole gradient (``grad_clip``, 1). Public settings: 300
steps, lr 5e-5, batch 64, lambda 0.5."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Method, check_fraction, check_nonneg, mean_over_processes


@dataclass
class SISSConfig:
    mixture: float = 0.5          # lambda: probability that a slot's x_t is drawn from its forget image
    forget_weight: float = 1.0    # s: weight of the subtracted forget term (0: importance-sampled fine-tuning on D_r)
    forget_norm: float | None = 5.0  # rescale the forget term's gradient to this L2 norm (None: s x its own gradient)


class SISS(Method):
    name = "siss"
    Config = SISSConfig
    needs = ("forget", "retain")
    null_strength = {}

    def __init__(self, model, data, config, scheduler, null_class, posterior=None):
        super().__init__(model, data, config, scheduler, null_class, posterior)
        check_fraction("mixture", config.mixture)
        check_nonneg("forget_weight", config.forget_weight)
        if config.forget_norm is not None:
            check_nonneg("forget_norm", config.forget_norm)

    def loss(self, model, batch):
        g, lam = batch.generator, self.config.mixture
        xf, xr = batch.forget, batch.retain[: len(batch.forget)]
        xf = xf[: len(xr)]
        b = len(xf)
        T = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, T, (b,), generator=g).to(xf.device)
        eps = torch.randn(xf.shape, generator=g).to(xf.device)
        from_f = (torch.rand(b, generator=g) < lam).to(xf.device)
        ab = self.scheduler.alphas_cumprod.to(xf.device)[t].view(-1, 1, 1, 1).float()
        x0 = torch.where(from_f.view(-1, 1, 1, 1), xf, xr)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        eps_r = (xt - ab.sqrt() * xr) / (1 - ab).sqrt()
        eps_f = (xt - ab.sqrt() * xf) / (1 - ab).sqrt()
        lq_r = -eps_r.pow(2).flatten(1).sum(1) / 2          # log q(x_t | x_0) up to a shared constant
        lq_f = -eps_f.pow(2).flatten(1).sum(1) / 2
        lmix = torch.logaddexp(lq_r + (math.log1p(-lam) if lam < 1 else -math.inf),
                               lq_f + (math.log(lam) if lam > 0 else -math.inf))
        w_r, w_f = (lq_r - lmix).exp().detach(), (lq_f - lmix).exp().detach()
        lab = batch.forget_labels
        if batch.retain_labels is not None:
            lab = torch.where(from_f, batch.forget_labels[:b], batch.retain_labels[:b])
        pred = model(xt, t, class_labels=lab).sample.float()
        L_r = (w_r * (pred - eps_r).pow(2).flatten(1).mean(1)).mean()
        L_f = (w_f * (pred - eps_f).pow(2).flatten(1).mean(1)).mean()
        with torch.no_grad():
            fl = (model(ab.sqrt() * xf + (1 - ab).sqrt() * eps, t, class_labels=batch.forget_labels[:b]
                        if batch.forget_labels is not None else None).sample.float() - eps).pow(2).mean()
        return {"loss": L_r - self.config.forget_weight * L_f, "L_r": L_r, "L_f": L_f, "forget_loss": fl}

    @classmethod
    def accumulates(cls, config):
        return config.forget_norm is None or config.forget_weight == 0   # otherwise the forget gradient is rescaled

    def backward(self, out, params):
        s = self.config.forget_weight
        if self.config.forget_norm is None or s == 0:
            return super().backward(out, params)
        gr = mean_over_processes(list(torch.autograd.grad(out["L_r"], params, retain_graph=True, allow_unused=True)))
        gf = mean_over_processes(list(torch.autograd.grad(out["L_f"], params, allow_unused=True)))
        nf = torch.sqrt(sum((x ** 2).sum() for x in gf if x is not None))
        c = self.config.forget_norm / nf.clamp_min(1e-12)
        for p, a, f in zip(params, gr, gf):
            if a is None and f is None:
                continue
            grad = (a if a is not None else 0) - s * c * (f if f is not None else 0)
            p.grad = grad if p.grad is None else p.grad + grad
