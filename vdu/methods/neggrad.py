"""NegGrad (docs/mathematics.md §3): gradient ascent on the forget-set denoising loss, ``L = -L_simple(D_f)``.

The simplest forget-only baseline and VDU with gamma = 0; unbounded below, so it lives on the loop's
stop rule and divergence guard. ``strength`` scales the loss (0 leaves the model in place)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, check_nonneg


@dataclass
class NegGradConfig:
    strength: float = 1.0      # multiplies -L_simple (AdamW is scale-invariant: 0 vs > 0 is what matters)


def neggrad_loss(unet, scheduler, x0: torch.Tensor, generator=None, labels=None, t=None, eps=None) -> dict:
    """``{"loss": -L_simple, "A": -L_simple, "forget_loss": L_simple (detached)}`` on the batch ``x0``."""
    from .vdu import plasticity_inducer
    A, per = plasticity_inducer(unet, scheduler, x0, "simple", "mean", None, labels, generator, t, eps)
    return {"loss": A, "A": A, "forget_loss": per.mean()}


class NegGrad(Method):
    name = "neggrad"
    Config = NegGradConfig
    needs = ("forget",)
    null_strength = {"strength": 0.0}

    def __init__(self, model, data, config, scheduler, null_class, posterior=None):
        super().__init__(model, data, config, scheduler, null_class, posterior)
        check_nonneg("strength", config.strength)

    def loss(self, model, batch):
        out = neggrad_loss(model, self.scheduler, batch.forget, batch.generator, batch.forget_labels)
        out["loss"] = self.config.strength * out["loss"]
        return out
