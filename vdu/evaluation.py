"""One evaluation path (methods.md §4) for the unlearning loop's monitoring, the experiments, the cards
and the notebooks: an :class:`EvalConfig` says how samples are drawn (count, sampler, steps, seed bank),
:func:`evaluate` draws them and measures the forget-class share, PUL against the model before
unlearning (same seed bank), the confident share, u-FID against real retained-class images and, when
images are given, the forget / retain NLL bound in bits/dim.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .diffusion import SAMPLERS, nll_bits_per_dim, sample
from .metrics import class_histogram, domain_fid, pul
from .models import null_class


@dataclass
class EvalConfig:
    n_samples: int = 256        # seed-bank samples per model
    sampler: str = "ddim"       # "ddim" | "ddpm" | "dpm" (vdu.diffusion.sample)
    steps: int = 20             # sampler steps
    seed: int = 0               # the seed bank (the same for the original and every unlearned model)
    nll_timesteps: int = 10     # stratified t-terms of the NLL bound (0: no NLL)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.n_samples < 1 or self.steps < 1 or self.nll_timesteps < 0:
            raise ValueError(f"need n_samples >= 1, steps >= 1, nll_timesteps >= 0 (got {self.n_samples}, "
                             f"{self.steps}, {self.nll_timesteps})")

    def sample(self, model, scheduler, class_labels=None, progress: bool = False) -> torch.Tensor:
        """``n_samples`` samples of ``model`` from this config's seed bank."""
        return sample(model, scheduler, self.n_samples, seed=self.seed, method=self.sampler, steps=self.steps,
                      class_labels=class_labels, progress=progress)


def evaluate(model, scheduler, evaluator, config: EvalConfig | None = None, data=None, before: dict | None = None,
             nll: bool = True, class_labels=None, progress: bool = False, samples: torch.Tensor | None = None
             ) -> tuple[dict, torch.Tensor]:
    """Sample ``model`` with ``config`` and measure it; returns (numbers, samples).

    ``data`` (a :class:`vdu.data.UnlearnData`) supplies the forget class (forget share; PUL when ``before``
    — this function's numbers for the original model — is given), the u-FID reference and the NLL images
    (a class-conditional model's NLL bound is its unconditional one, under the null class).
    ``numbers["labels"]`` holds the evaluator labels (what PUL of later models is counted against).
    ``samples``: this config's samples of ``model``, drawn earlier (they do not depend on the forget class,
    so one draw of the pretrained model serves every class)."""
    cfg = config if config is not None else EvalConfig()
    x = samples if samples is not None else cfg.sample(model, scheduler, class_labels, progress)
    out = {"n_samples": len(x), "sampler": cfg.sampler, "ddim_steps": cfg.steps, "seed_bank": cfg.seed,
           **measure(evaluator, x, data, before)}
    if nll and cfg.nll_timesteps > 0 and data is not None:
        null = null_class(model)            # conditional models: the unconditional (null-class) likelihood
        for key, imgs in (("forget_nll", data.nll_forget), ("retain_nll", data.nll_retain)):
            if imgs is not None:
                lab = None if null is None else torch.full((len(imgs),), null)
                out[key] = nll_bits_per_dim(model, scheduler, imgs, class_labels=lab, timesteps=cfg.nll_timesteps,
                                            seed=cfg.seed, progress=False).mean().item()
    return out, x


def measure(evaluator, x: torch.Tensor, data=None, before: dict | None = None) -> dict:
    """The sample metrics of :func:`evaluate` on given samples ``x``: confident share and class counts; with
    ``data.forget_class`` the forget share (and PUL against ``before["labels"]``); with ``data.reference``
    u-FID. Non-finite samples raise (they cannot be scored)."""
    if not torch.isfinite(x).all():
        raise FloatingPointError("non-finite samples cannot be scored: the model has diverged")
    h = class_histogram(evaluator, x)
    out = {"confident_share": h["confident_share"], "counts": h["counts"], "labels": h["labels"]}
    c = getattr(data, "forget_class", None)
    if c is not None:
        out["forget_share"] = h["shares"][c]
        if before is not None:
            try:
                out["pul"] = pul(before["labels"], h["labels"], c)
            except ValueError:
                out["pul"] = float("nan")
    if getattr(data, "reference", None) is not None:
        out["u_fid"] = domain_fid(evaluator, x, data.reference)
        out["u_fid_reference"] = len(data.reference)
    return out
