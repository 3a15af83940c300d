"""Class-unlearning experiments of notebooks/vdu_unlearning (section "Full profile"): one forget/reference
split per class, one call that unlearns and measures, so a table row is one line in the notebook.

Every number comes from :func:`vdu.unlearning.measure` (methods.md §4: PUL, forget share, confident share,
u-FID, forget / retain NLL bound), always on the same seed bank as the pretrained model's numbers.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from .data import ImageData
from .unlearning import measure, unlearn


@dataclass
class ForgetSplit:
    forget_class: int
    forget: torch.Tensor        # D_f: forget-class *training* images the method may use
    reference: torch.Tensor     # u-FID reference: real retained-class test images
    nll_forget: torch.Tensor    # forget-class test images for the NLL bound
    nll_retain: torch.Tensor    # retained-class test images for the NLL bound


def forget_split(train: ImageData, test: ImageData, forget_class: int, n: int | None = None,
                 fraction: float | None = None, n_reference: int = 500, nll_images: int = 16,
                 seed: int = 0) -> ForgetSplit:
    """The data of one class-unlearning run: ``n`` (or ``fraction`` of the) forget-class training images,
    retained-class test images for u-FID, forget / retain test images for the NLL bound."""
    c = train.class_ids([forget_class])[0]
    f_train, _ = train.split(c)
    f_test, r_test = test.split(c)
    return ForgetSplit(c, f_train.take(n, fraction=fraction, seed=seed).images,
                       r_test.take(n_reference, seed=seed).images, f_test.take(nll_images, seed=seed).images,
                       r_test.take(nll_images, seed=seed + 1).images)


@dataclass
class Evaluation:
    n_samples: int = 256        # seed-bank samples per model
    ddim_steps: int = 20        # DDIM steps of those samples
    seed: int = 0               # the seed bank (the same for the original and every unlearned model)
    nll_timesteps: int = 10     # stratified t-terms of the NLL bound (0: no NLL)

    def __call__(self, unet, scheduler, evaluator, split: ForgetSplit, before: dict | None = None,
                 nll: bool = True) -> tuple[dict, torch.Tensor]:
        nll = nll and self.nll_timesteps > 0
        return measure(unet, scheduler, evaluator, split.forget_class, split.reference, self.n_samples,
                       self.ddim_steps, self.seed, before=before,
                       forget_nll_images=split.nll_forget if nll else None,
                       retain_nll_images=split.nll_retain if nll else None, nll_timesteps=self.nll_timesteps)


def unlearn_and_measure(unet, scheduler, evaluator, split: ForgetSplit, before: dict, config: dict,
                        evaluation: Evaluation, posterior=None, method: str = "vdu", nll: bool = True,
                        name: str = "") -> dict:
    """Unlearn ``split.forget`` from ``unet`` with ``config`` (UnlearnConfig fields) and return one table row:
    the run (steps, stop reason, seconds) and the numbers before -> after (``before``: ``evaluation`` of
    the original model on the same split)."""
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # guard events are kept in the log
        m = unlearn(unet, split.forget, method, scheduler, posterior=posterior, **{"progress": False, **config})
    secs = time.time() - t0
    after, _ = evaluation(m, scheduler, evaluator, split, before=before, nll=nll)
    log = m.unlearn_log
    row = {"config": name, "forget_class": split.forget_class, "n_forget": len(split.forget),
           "steps": log.steps_done, "stop": log.stop_reason, "unlearn_s": round(secs, 1),
           "pul": after.get("pul"), "u_fid_ratio": after["u_fid"] / before["u_fid"]}
    for k in ("forget_share", "confident_share", "u_fid", "forget_nll", "retain_nll"):
        if k in after and k in before:
            row[f"{k}_before"], row[f"{k}_after"] = before[k], after[k]
    return row


def scale_table(unet, scheduler, posterior: dict, x: torch.Tensor, dataset_size: int, seed: int = 0) -> list[dict]:
    """Notebook section "The posterior and the scale mismatch": A, B and their gradient norms at the
    current weights for each normalisation and centre of B (methods.md §1, scale-mismatch hazard)."""
    from .objectives import CENTERS, NORMALIZATIONS, StabilityRegularizer, plasticity_inducer

    params = list(unet.parameters())
    rows = []
    for norm in NORMALIZATIONS:
        for cen in reversed(CENTERS):   # "deployed" first
            B = StabilityRegularizer(unet, posterior, cen, norm)(unet)
            gB = torch.autograd.grad(B, params, allow_unused=True)
            A, _ = plasticity_inducer(unet, scheduler, x, normalization=norm, dataset_size=dataset_size,
                                      generator=torch.Generator().manual_seed(seed))
            gA = torch.autograd.grad(A, params)
            rows.append(dict(normalization=norm, center=cen, A=A.item(), B=B.item(),
                             grad_A=torch.sqrt(sum((g ** 2).sum() for g in gA)).item(),
                             grad_B=torch.sqrt(sum((g ** 2).sum() for g in gB if g is not None)).item()))
    return rows


def trajectory(unet, scheduler, evaluator, split: ForgetSplit, config: dict, evaluation: Evaluation, steps: int,
               every: int, posterior=None, method: str = "vdu") -> list[dict]:
    """Notebook section "Which stability term holds the model": ``config`` run for ``steps`` steps with the
    stop rule off, evaluated every ``every`` steps on ``evaluation``'s seed bank (PUL, confident share,
    u-FID vs ``split.reference``), each point with the probe forget loss relative to the pretrained one."""
    m = unlearn(unet, split.forget, method, scheduler, posterior=posterior, evaluator=evaluator,
                forget_class=split.forget_class, eval_reference=split.reference,
                **{**config, "steps": steps, "stop_forget_ratio": None, "eval_every": every,
                   "eval_samples": evaluation.n_samples, "eval_ddim_steps": evaluation.ddim_steps,
                   "eval_seed": evaluation.seed, "progress": False})
    probes = m.unlearn_log.probes
    ratio = {p["step"]: p["forget_loss"] / probes[0]["forget_loss"] for p in probes}
    return [dict(e, forget_loss_ratio=ratio.get(e["step"])) for e in m.unlearn_log.evals]
