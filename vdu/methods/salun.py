"""SalUn, saliency unlearning (Fan et al. 2024): only the weights most salient for the forget loss move.

1. **Saliency mask**, once, at the pretrained weights: ``m = 1[|grad_theta L_simple(D_f)| >= q]`` with q the
   ``1 - sparsity`` quantile over all weights (the paper keeps the top 50%).
2. **Relabelling + retain**: on a noised forget image x_t the prediction under the forgotten class is
   pulled to the model's own (stop-gradient) prediction under a random other class c' != c,
   ``||eps_theta(x_t, c) - sg(eps_theta(x_t, c'))||^2``, plus ``retain_weight * L_simple(D_r)``; the gradient
   is multiplied by m before each step. Public settings: 1,000 iterations, batch 128, lr 1e-4, alpha
   (``retain_weight``) 1e-3 — alpha 0 collapses every class.

An unconditional model has no label to swap: its forget term is gradient ascent on the forget images
(``-L_simple(D_f)``), kept in check by the retain term, under the same mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion import forward_noise
from .base import Method, check_fraction, check_nonneg


@dataclass
class SalUnConfig:
    sparsity: float = 0.5        # fraction of weights frozen by the mask (the paper: 0.5)
    retain_weight: float = 1e-3  # weight of L_simple(D_r) (the paper's alpha)
    mask_batches: int = 4        # forget batches whose gradient magnitudes make the mask
    mask_batch_size: int = 64    # images per mask batch


class SalUn(Method):
    name = "salun"
    Config = SalUnConfig
    needs = ("forget", "retain")
    null_strength = {"sparsity": 1.0}   # every weight masked

    def __init__(self, model, data, config, scheduler, null_class, posterior=None):
        super().__init__(model, data, config, scheduler, null_class, posterior)
        check_fraction("sparsity", config.sparsity)
        check_nonneg("retain_weight", config.retain_weight)
        if config.mask_batches < 1 or config.mask_batch_size < 1:
            raise ValueError("mask_batches and mask_batch_size must be >= 1")
        self.mask = self._saliency(model, data)

    def _saliency(self, model, data):
        params = [p for p in model.parameters() if p.requires_grad]
        acc = [torch.zeros_like(p) for p in params]
        g = torch.Generator().manual_seed(4242)
        dev = params[0].device
        c = data.forget_class if self.null is not None else None
        for _ in range(self.config.mask_batches):
            idx = torch.randint(0, len(data.forget), (min(self.config.mask_batch_size, len(data.forget)),), generator=g)
            x = data.forget[idx].to(dev)
            lab = None if self.null is None else torch.full((len(x),), self.null if c is None else c, device=dev)
            l, _ = self.denoising(model, x, lab, g)
            for a, gr in zip(acc, torch.autograd.grad(l.mean(), params, allow_unused=True)):
                if gr is not None:
                    a.add_(gr.abs())
        flat = torch.cat([a.flatten() for a in acc])
        k = int(round(self.config.sparsity * flat.numel()))
        if k <= 0:
            return [torch.ones_like(a) for a in acc]
        q = flat.kthvalue(k).values
        return [(a > q).float() for a in acc]

    def loss(self, model, batch):
        g = batch.generator
        r, _ = self.denoising(model, batch.retain, batch.retain_labels, g)
        lab = batch.forget_labels
        if self.null is not None and self.data.forget_class is not None:
            # random other labels c' != c (uniform over the remaining classes)
            k = self.null                                 # number of real classes
            shift = torch.randint(1, k, (len(batch.forget),), generator=g).to(lab.device)
            relabel = (lab + shift) % k
            xt, t, eps = forward_noise(self.scheduler, batch.forget, g)
            with torch.no_grad():
                target = model(xt, t, class_labels=relabel).sample.float()
            pred = model(xt, t, class_labels=lab).sample.float()
            forget_term, name = (pred - target).pow(2).mean(), "relabel"
            fl = (pred.detach() - eps).pow(2).flatten(1).mean(1)
        else:
            f, _ = self.denoising(model, batch.forget, lab, g)
            forget_term, name, fl = -f.mean(), "ascent", f.detach()
        return {"loss": forget_term + self.config.retain_weight * r.mean(), name: forget_term.detach(),
                "retain_loss": r.mean().detach(), "forget_loss": fl.mean()}

    def transform_grads(self, params):
        for p, m in zip(params, self.mask):
            if p.grad is not None:
                p.grad.mul_(m)
