"""Class-unlearning experiments of the notebooks: "unlearn and measure" as one table row, the scale table
and the trajectories of notebooks/vdu_unlearning.

Every number comes from :func:`vdu.evaluation.evaluate` (docs/mathematics.md §4: PUL, forget share, confident
share, u-FID, forget / retain NLL bound), always on the same seed bank as the pretrained model's numbers.
The data of a run is a :class:`vdu.data.UnlearnData` (``vdu.data.class_split`` makes one per class).
"""
from __future__ import annotations

import time
import warnings

import torch

from .data import UnlearnData
from .evaluation import EvalConfig, evaluate
from .unlearning import unlearn


def unlearn_and_measure(unet, scheduler, evaluator, data: UnlearnData, before: dict, config: dict,
                        evaluation: EvalConfig, posterior=None, method: str = "vdu", nll: bool = True,
                        name: str = "", return_model: bool = False, class_labels=None):
    """Unlearn ``data`` from ``unet`` with ``config`` (loop and method options) and return one table row: the
    run (steps, stop reason, seconds) and the numbers before -> after (``before``: ``evaluate`` of the
    original model with the same ``evaluation`` and data). ``return_model``: return ``(row, model)``.
    ``class_labels``: the prompts of a class-conditional model's samples (the same as for ``before``)."""
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # guard events are kept in the log
        m = unlearn(unet, data, method, scheduler, posterior=posterior, **{"progress": False, **config})
    secs = time.time() - t0
    after, _ = evaluate(m, scheduler, evaluator, evaluation, data, before=before, nll=nll, class_labels=class_labels)
    log = m.unlearn_log
    row = {"config": name, "method": method, "forget_class": data.forget_class, "n_forget": len(data.forget),
           "n_retain": 0 if data.retain is None else len(data.retain), "steps": log.steps_done,
           "stop": log.stop_reason, "unlearn_s": round(secs, 1), "pul": after.get("pul"), "pul_ci": after.get("pul_ci"),
           "u_fid_ratio": after["u_fid"] / before["u_fid"], "n_samples": after["n_samples"]}
    for k in ("forget_share", "confident_share", "u_fid", "forget_nll", "retain_nll"):
        if k in after and k in before:
            row[f"{k}_before"], row[f"{k}_after"] = before[k], after[k]
            if f"{k}_ci" in after:
                row[f"{k}_before_ci"], row[f"{k}_after_ci"] = before.get(f"{k}_ci"), after[f"{k}_ci"]
    return (row, m) if return_model else row


def scale_table(unet, scheduler, posterior: dict, x: torch.Tensor, dataset_size: int, seed: int = 0) -> list[dict]:
    """Notebook section "The posterior and the scale mismatch": A, B and their gradient norms at the
    current weights for each normalisation and centre of B (docs/mathematics.md §1, scale-mismatch hazard)."""
    from .methods.vdu import CENTERS, NORMALIZATIONS, StabilityRegularizer, plasticity_inducer

    params = list(unet.parameters())
    x = x.to(params[0].device)
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


def trajectory(unet, scheduler, evaluator, data: UnlearnData, config: dict, evaluation: EvalConfig, steps: int,
               every: int, posterior=None, method: str = "vdu") -> list[dict]:
    """Notebook section "Which stability term holds the model": ``config`` run for ``steps`` steps with the
    stop rule off, evaluated every ``every`` steps on ``evaluation``'s seed bank (PUL, confident share,
    u-FID vs ``data.reference``), each point with the probe forget loss relative to the pretrained one."""
    m = unlearn(unet, data, method, scheduler, posterior=posterior, evaluator=evaluator,
                **{**config, "steps": steps, "stop_forget_ratio": None, "eval_every": every,
                   "eval_samples": evaluation.n_samples, "eval_ddim_steps": evaluation.steps,
                   "eval_seed": evaluation.seed, "progress": False})
    probes = m.unlearn_log.probes
    ratio = {p["step"]: p["forget_loss"] / probes[0]["forget_loss"] for p in probes}
    return [dict(e, forget_loss_ratio=ratio.get(e["step"])) for e in m.unlearn_log.evals]


def relearn(model, scheduler, images: torch.Tensor, steps: int = 50, lr: float = 1e-4, batch_size: int = 16,
            seed: int = 0, class_label: int | None = None) -> torch.nn.Module:
    """Relearning attack: a copy of ``model`` fine-tuned on a few forget images with L_simple (AdamW, constant
    ``lr``). How much of the forgotten class comes back measures whether unlearning removed it or only hid
    it. ``class_label``: the prompt of a class-conditional model."""
    import copy

    from .diffusion import denoising_loss
    from .models import null_class

    if steps < 0 or batch_size < 1 or len(images) == 0:
        raise ValueError(f"need steps >= 0, batch_size >= 1 and some images (got {steps}, {batch_size}, {len(images)})")
    m = copy.deepcopy(model).train()
    dev = next(m.parameters()).device
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    null = null_class(m)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=g)
        lab = None if null is None else torch.full((len(idx),), null if class_label is None else class_label,
                                                   device=dev)
        loss = denoising_loss(m, scheduler, images[idx].to(dev), lab, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return m.eval()
