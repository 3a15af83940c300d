"""EraseDiff (Wu et al. 2024): keep the retain loss while the forget images' noise predictions are fitted
to noise that has nothing to do with them.

    L_r = L_simple(D_r)
    L_f = E || eps_theta(x_t^f, t) - u ||^2,     x_t^f from a forget image, u ~ U[0, 1) drawn independently

The paper poses ``min L_r`` subject to the forget batch being fitted to the non-forget target and solves
the bi-level problem with a first-order step ``g = g_r + lambda g_f`` where the multiplier adapts to how
the two gradients agree: ``lambda = max(eta - cos(g_r, g_f), 0)``. We take that step every iteration
(the inner fit of the forget batch is the single gradient g_f, a one-step inner loop). Public settings:
see the authors' repository; ``eta = 1`` keeps lambda in [0, 2]."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion import forward_noise
from .base import Method, check_nonneg, mean_over_processes

TARGETS = ("uniform", "gaussian")


@dataclass
class EraseDiffConfig:
    eta: float = 1.0             # lambda = max(eta - cos(g_r, g_f), 0) (0: lambda = 0 unless the gradients oppose)
    forget_scale: float = 1.0    # extra factor on lambda g_f (0: plain fine-tuning on D_r)
    target: str = "uniform"      # forget target noise: "uniform" U[0, 1) (the paper) or "gaussian" N(0, I)


class EraseDiff(Method):
    name = "erasediff"
    Config = EraseDiffConfig
    needs = ("forget", "retain")
    null_strength = {}           # forget_scale 0 still fine-tunes on D_r

    def __init__(self, model, data, config, scheduler, null_class, posterior=None):
        super().__init__(model, data, config, scheduler, null_class, posterior)
        check_nonneg("eta", config.eta)
        check_nonneg("forget_scale", config.forget_scale)
        if config.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {config.target!r}")

    def loss(self, model, batch):
        g = batch.generator
        r, _ = self.denoising(model, batch.retain, batch.retain_labels, g)
        xt, t, eps = forward_noise(self.scheduler, batch.forget, g)
        u = (torch.rand if self.config.target == "uniform" else torch.randn)(eps.shape, generator=g).to(eps.device)
        pred = model(xt, t, class_labels=batch.forget_labels).sample.float()
        f = (pred - u).pow(2).mean()
        return {"loss": r.mean() + f, "L_r": r.mean(), "L_f": f, "forget_loss": (pred.detach() - eps).pow(2).mean()}

    def backward(self, out, params):
        gr = mean_over_processes(list(torch.autograd.grad(out["L_r"], params, retain_graph=True, allow_unused=True)))
        gf = mean_over_processes(list(torch.autograd.grad(out["L_f"], params, allow_unused=True)))
        z = lambda a, p: a if a is not None else torch.zeros_like(p)  # noqa: E731
        gr, gf = [z(a, p) for a, p in zip(gr, params)], [z(a, p) for a, p in zip(gf, params)]
        dot = sum((a * b).sum() for a, b in zip(gr, gf))
        nr = torch.sqrt(sum((a ** 2).sum() for a in gr))
        nf = torch.sqrt(sum((b ** 2).sum() for b in gf))
        lam = torch.clamp(self.config.eta - dot / (nr * nf).clamp_min(1e-12), min=0.0) * self.config.forget_scale
        self.last_lambda = float(lam)
        for p, a, b in zip(params, gr, gf):
            p.grad = a + lam * b
