"""ESD, Erased Stable Diffusion (Gandikota et al. 2023), for class-conditional models: negative guidance
against a frozen copy of the pretrained model, in one line::

    L = || eps_theta(x_t, c) - [eps*(x_t, null) - eta (eps*(x_t, c) - eps*(x_t, null))] ||^2

c is the forgotten class (the prompt), eps* the frozen pretrained model, eta the negative-guidance scale
(public setting: eta = 1). As in the paper, x_t is not data: each step partially denoises fresh noise
under the prompt c with the model being trained (DDIM, ``sample_steps`` steps, stopped at a random
one), so ESD needs the concept alone; ``xt_source="forget"`` instead noises the forget images with
the forward process (cheaper; the same support on a class-conditional DDPM). The target pushes the
prompt's noise prediction away from the class direction, so prompt c no longer yields a c."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from ..diffusion import forward_noise
from .base import Method, check_nonneg

SOURCES = ("sample", "forget")


@dataclass
class ESDConfig:
    eta: float = 1.0             # negative-guidance scale (0: the target is the unconditional prediction)
    xt_source: str = "sample"    # "sample": partial DDIM sampling under the prompt (the paper); "forget": noised D_f
    sample_steps: int = 10       # DDIM steps of the partial sampling (x_t is taken after a random number of them)


class ESD(Method):
    name = "esd"
    Config = ESDConfig
    needs = ("forget", "teacher", "conditional")
    null_strength = {}           # eta = 0 still moves c towards the unconditional branch

    def __init__(self, model, data, config, scheduler, null_class, posterior=None):
        super().__init__(model, data, config, scheduler, null_class, posterior)
        check_nonneg("eta", config.eta)
        if config.xt_source not in SOURCES:
            raise ValueError(f"xt_source must be one of {SOURCES}, got {config.xt_source!r}")
        if config.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {config.sample_steps}")
        self.ddim = DDIMScheduler.from_config(scheduler.config)
        self.ddim.set_timesteps(config.sample_steps)

    @torch.no_grad()
    def _partial_sample(self, model, c, shape, g):
        """x_t after k of ``sample_steps`` DDIM steps from noise under the prompt c (k uniform in 0..steps-1)."""
        k = int(torch.randint(0, self.config.sample_steps, (1,), generator=g))
        x = torch.randn(shape, generator=g).to(c.device)
        was = model.training
        model.eval()
        ts = self.ddim.timesteps
        for t in ts[:k]:
            tt = torch.full((len(x),), int(t), device=x.device)
            x = self.ddim.step(model(x, tt, class_labels=c).sample, t, x).prev_sample
        model.train(was)
        return x, torch.full((len(x),), int(ts[k]), device=x.device)

    def _xt(self, model, c, forget, g):
        """x_t and t of the prompt c: partial DDIM sampling under c, or the forget images noised (``xt_source``)."""
        if self.config.xt_source == "sample":
            return self._partial_sample(model, c, forget.shape, g)
        xt, t, _ = forward_noise(self.scheduler, forget, g)
        return xt, t

    @torch.no_grad()
    def _branches(self, xt, t, c):
        """The frozen teacher's (eps_q(x_t, c), eps_q(x_t, null)), in one batched call."""
        both = self.teacher(torch.cat([xt, xt]), torch.cat([t, t]),
                            class_labels=torch.cat([c, torch.full_like(c, self.null)])).sample.float()
        return both.chunk(2)

    def loss(self, model, batch):
        c = batch.forget_labels
        xt, t = self._xt(model, c, batch.forget, batch.generator)
        e_c, e_u = self._branches(xt, t, c)
        with torch.no_grad():
            target = e_u - self.config.eta * (e_c - e_u)
            fl, _ = self.denoising(model, batch.forget, c, batch.generator)
        loss = (model(xt, t, class_labels=c).sample.float() - target).pow(2).mean()
        return {"loss": loss, "esd": loss.detach(), "forget_loss": fl.mean()}
