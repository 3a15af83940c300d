"""Fine-tuning on the retain set: ``L = L_simple(D_r)`` (needs retain data).

The "catastrophic forgetting" baseline of the unlearning literature: keep training on what should
stay and let the forget class fade. It never looks at D_f (the loop still measures the forget loss
on it). Typical settings: the pretraining learning rate, a few hundred to a few thousand steps."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, check_nonneg


@dataclass
class FinetuneConfig:
    strength: float = 1.0      # multiplies L_simple(D_r) (0 leaves the model in place)


class Finetune(Method):
    name = "finetune"
    Config = FinetuneConfig
    needs = ("forget", "retain")
    null_strength = {"strength": 0.0}

    def __init__(self, model, data, config, scheduler, null_class, posterior=None):
        super().__init__(model, data, config, scheduler, null_class, posterior)
        check_nonneg("strength", config.strength)

    def loss(self, model, batch):
        with torch.no_grad():
            f, _ = self.denoising(model, batch.forget, batch.forget_labels, batch.generator)
        r, _ = self.denoising(model, batch.retain, batch.retain_labels, batch.generator)
        return {"loss": self.config.strength * r.mean(), "retain_loss": r.mean().detach(), "forget_loss": f.mean()}
