"""The public entry point every unlearning method shares: ``unlearn(model, forget_data, method=...)``.

    from vdu.unlearning import unlearn
    model = unlearn(unet, forget_images, method="vdu", scheduler=scheduler,
                    posterior="checkpoints/mnist/ddpm/posterior.safetensors", gamma=0.5, steps=100)
    model.unlearn_log.summary()        # A, B, loss per step; probes; evaluations; why it stopped

Works on any diffusers ``UNet2DModel`` (ours or a user's; unconditional or with a class embedding,
in which case the null class is used). One config dataclass (:class:`UnlearnConfig`, a comment per
field, nanoGPT style); keyword arguments of ``unlearn`` override its fields.

What makes the run robust (methods.md §1 hazards: A is unbounded below, the useful gamma range is
narrow, a collapsed model can look like forgetting):

- **Stop rule** (the likelihood-constraint view of methods.md §2, LU: ``E_{D_f}[-log p] >= b``):
  every ``probe_every`` steps the forget-set denoising loss is measured on a *fixed* probe (fixed
  images, t and eps, so the numbers are comparable along the run), and optionally the NLL bound in
  bits/dim. The run stops as soon as the probe loss reaches ``stop_forget_ratio`` times its
  pretrained value, or the forget NLL rises by ``stop_nll_delta`` bits/dim — the constraint is then
  satisfied, and pushing A further only destroys the model.
- **Divergence guard**: a non-finite loss/A/B/gradient, or a forget loss above ``explode_ratio``
  times its initial value, stops the run, restores the last weights whose loss was finite and sane,
  warns, and records the event in the log.
- **The stability term** (``stability``): "posterior" is the paper's B (K-checkpoint Gaussian over the
  parameters); "function" the pathwise KL to the pretrained model on its own samples
  (``vdu.objectives.function_space_kl``), which needs no retain data either. ``optimizer`` "sgd" and
  ``precondition`` (steps scaled by sigma*^2) change how the parameter-space objective is optimised.
- **Quality monitoring** (optional, needs an evaluator): every ``eval_every`` steps, samples from a
  fixed seed bank give the forget-class share, PUL and the confident share; with
  ``collapse_confident_min`` the run stops and restores the previous evaluation's weights when the
  confident share drops below it (blank/garbage samples are not unlearning).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import objectives
from .models import build_scheduler, check_images, null_class, save_model

METHODS = ("vdu", "neggrad")
OPTIMIZERS = ("adamw", "sgd")
STABILITIES = ("posterior", "function")


@dataclass
class UnlearnConfig:
    # --- the objective (vdu.objectives, methods.md §1) ---
    gamma: float = 0.5                # weight of B: L = gamma * B + (1 - gamma) * A, in [0, 1]
    stability: str = "posterior"      # B: "posterior" (methods.md §1, Gaussian from K checkpoints) or "function"
                                      #    (pathwise KL(q || p_theta) on replay samples of the pretrained model, §2)
    replay_samples: int = 256         # stability="function": pretrained-model samples drawn once (seed bank replay_seed)
    replay_ddim_steps: int = 20       # DDIM steps of those samples
    replay_seed: int = 12345          # seed bank of the replay samples (not the evaluation's)
    normalization: str = "mean"       # "mean": B / P and A = batch-pixel mean; "sum": the literal sums
    center: str = "deployed"          # mu* of B: "deployed" (theta*, the served weights) or "mean" (checkpoint mean)
    weighting: str = "simple"         # C_t: "simple" (1, L_simple) or "elbo" (DDPM ELBO weights)
    var_floor: float = 1e-8           # floor of sigma*^2 in B
    # --- optimisation ---
    steps: int = 100                  # maximum AdamW steps (the stop rule may end the run earlier)
    batch_size: int = 64              # forget images per step (fewer if the forget set is smaller)
    lr: float = 1e-4                  # learning rate (constant)
    optimizer: str = "adamw"          # "adamw" or "sgd" (plain gradient steps: the move is proportional to the gradient)
    precondition: bool = False        # scale each gradient by sigma*_i^2 / mean(sigma*^2): mobile where the posterior is wide
    weight_decay: float = 0.0         # AdamW weight decay (0: B is the only pull towards theta*)
    grad_clip: float | None = 1.0     # gradient-norm clip (None: off)
    seed: int = 0                     # batches, t and eps of the run and of the probe
    # --- stop rule (likelihood constraint, methods.md §2) ---
    probe_every: int = 5              # measure the fixed forget probe every N steps (0: never)
    probe_size: int = 64              # forget images in the probe
    stop_forget_ratio: float | None = None  # stop when probe L_simple >= ratio * pretrained value
    stop_nll_delta: float | None = None     # stop when probe forget NLL bound rises by this many bits/dim
    nll_timesteps: int = 10           # stratified t-terms of the probe NLL bound (only if stop_nll_delta)
    nll_images: int = 16              # probe images for the NLL bound
    # --- divergence guard ---
    explode_ratio: float = 1e3        # diverged if the batch forget loss > ratio * its initial value
    # --- quality monitoring (optional; needs evaluator and forget_class) ---
    eval_every: int = 0               # evaluate PUL + confident share every N steps (0: never)
    eval_samples: int = 64            # seed-bank samples per evaluation
    eval_ddim_steps: int = 10         # DDIM steps of those samples
    eval_seed: int = 0                # seed bank of the evaluation samples
    collapse_confident_min: float | None = None  # stop + restore if the confident share falls below this
    # --- misc ---
    inplace: bool = False             # modify ``model`` itself instead of a deep copy
    progress: bool = True             # tqdm progress bar
    device: str | None = None         # default: the model's device
    save_to: str | None = None        # save the unlearned model folder here (save_model, save_pretrained-style)


@dataclass
class UnlearnLog:
    """What happened: per-step A, B, loss; probes; evaluations; the stop reason."""

    method: str
    config: dict
    steps: list = field(default_factory=list)      # {"step", "loss", "A", "B", "forget_loss", "grad_norm"}
    probes: list = field(default_factory=list)     # {"step", "forget_loss"[, "forget_nll"]}
    evals: list = field(default_factory=list)      # {"step", "forget_share", "pul", "confident_share", ...}
    events: list = field(default_factory=list)     # human-readable notes (divergence, stop, restore)
    stop_reason: str = "max_steps"                 # max_steps | stop_rule | diverged | collapse | callback
    steps_done: int = 0                            # optimiser steps whose result was kept
    wall_s: float = 0.0

    def summary(self) -> dict:
        last = self.probes[-1] if self.probes else {}
        first = self.probes[0] if self.probes else {}
        return {"method": self.method, "stop_reason": self.stop_reason, "steps_done": self.steps_done,
                "wall_s": round(self.wall_s, 2), "forget_loss_start": first.get("forget_loss"),
                "forget_loss_end": last.get("forget_loss"), "forget_nll_start": first.get("forget_nll"),
                "forget_nll_end": last.get("forget_nll"), "events": self.events, "config": self.config}

    def to_dict(self) -> dict:
        return asdict(self)


def _as_images(forget_data) -> torch.Tensor:
    x = getattr(forget_data, "images", forget_data)
    if not torch.is_tensor(x):
        raise TypeError(f"forget_data must be an ImageData or an (N, C, H, W) tensor, got {type(forget_data).__name__}")
    if x.ndim == 4 and len(x) == 0 or x.numel() == 0:
        raise ValueError("the forget set is empty: nothing to unlearn")
    return x


def _resolve_posterior(posterior, model):
    from .posterior import load_posterior
    if posterior is None:
        raise ValueError("method='vdu' needs the K-checkpoint posterior (methods.md §1): pass posterior= a "
                         "posterior.safetensors path (make it with `python -m vdu posterior MODEL_DIR`) or the dict "
                         "of vdu.posterior.load_posterior")
    if isinstance(posterior, (str, os.PathLike)):
        return load_posterior(posterior, model)  # raises for another architecture
    return posterior


class _Probe:
    """Fixed forget images, t and eps: the forget loss along the run, comparable across steps."""

    def __init__(self, x, scheduler, cfg, labels):
        g = torch.Generator().manual_seed(cfg.seed + 7919)
        idx = torch.randperm(len(x), generator=g)[: cfg.probe_size]
        self.x = x[idx]
        T = scheduler.config.num_train_timesteps
        # stratified t so that a small probe covers the whole schedule
        n = len(self.x)
        self.t = ((torch.arange(n) + torch.rand(n, generator=g)) * T / n).long().clamp_max(T - 1)
        self.eps = torch.randn(self.x.shape, generator=g)
        self.nll_x = self.x[: cfg.nll_images]
        self.labels = labels[: n] if labels is not None else None
        self.scheduler, self.cfg = scheduler, cfg

    @torch.no_grad()
    def __call__(self, unet, with_nll: bool) -> dict:
        was = unet.training
        unet.eval()
        dev = next(unet.parameters()).device
        _, per = objectives.plasticity_inducer(unet, self.scheduler, self.x.to(dev), t=self.t, eps=self.eps,
                                               labels=None if self.labels is None else self.labels.to(dev))
        out = {"forget_loss": per.mean().item()}
        if with_nll:
            from .likelihood import nll_bits_per_dim
            lab = None if self.labels is None else self.labels[: len(self.nll_x)]
            out["forget_nll"] = nll_bits_per_dim(unet, self.scheduler, self.nll_x, class_labels=lab,
                                                 timesteps=self.cfg.nll_timesteps, seed=self.cfg.seed,
                                                 progress=False).mean().item()
        unet.train(was)
        return out


def make_evaluation(evaluator, forget_class: int, scheduler, n: int = 64, ddim_steps: int = 10, seed: int = 0,
                    reference=None) -> Callable:
    """A callback ``f(model) -> dict`` measuring forget share, PUL (vs the first call) and confident share
    on ``n`` seed-bank samples (optionally domain FID vs ``reference`` images)."""
    from .metrics import class_histogram, domain_fid, pul
    from .sampling import sample
    state = {}

    def f(model):
        x = sample(model, scheduler, n, seed=seed, steps=ddim_steps, progress=False)
        h = class_histogram(evaluator, x)
        if "before" not in state:
            state["before"] = h["labels"]
        out = {"forget_share": h["shares"][forget_class], "confident_share": h["confident_share"]}
        try:
            out["pul"] = pul(state["before"], h["labels"], forget_class)
        except ValueError:
            out["pul"] = float("nan")
        if reference is not None:
            out["u_fid"] = domain_fid(evaluator, x, reference)
        return out

    return f


def unlearn(model, forget_data, method: str = "vdu", scheduler=None, posterior=None,
            config: UnlearnConfig | None = None, evaluator=None, forget_class: int | None = None,
            callback: Callable | None = None, eval_reference=None, **overrides):
    """Unlearn ``forget_data`` (ImageData or an (N, C, H, W) tensor in [-1, 1]) from a diffusers UNet.

    ``method``: 'vdu' (methods.md §1; needs ``posterior``: a path or a ``load_posterior`` dict) or
    'neggrad'. ``scheduler``: the model's DDPM noise schedule (default ``build_scheduler()``).
    ``config`` / ``**overrides``: :class:`UnlearnConfig` fields. ``evaluator`` + ``forget_class``
    turn on the evaluations of ``eval_every`` (with u-FID when ``eval_reference``, real retained-class
    images, is given); ``callback(step, model, log)`` is called after every
    step and may return True to stop. Returns the unlearned model, with ``model.unlearn_log``
    (:class:`UnlearnLog`). The model is left in eval mode.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    cfg = copy.deepcopy(config) if config is not None else UnlearnConfig()
    names = {f.name for f in fields(UnlearnConfig)}
    for k, v in overrides.items():
        if k not in names:
            raise TypeError(f"unknown unlearn option {k!r}; UnlearnConfig fields: {sorted(names)}")
        setattr(cfg, k, v)
    objectives.check_gamma(cfg.gamma)
    objectives._check("normalization", cfg.normalization, objectives.NORMALIZATIONS)
    objectives._check("center", cfg.center, objectives.CENTERS)
    objectives._check("weighting", cfg.weighting, objectives.WEIGHTINGS)
    if cfg.stability not in STABILITIES:
        raise ValueError(f"stability must be one of {STABILITIES}, got {cfg.stability!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    if cfg.steps < 0 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError(f"need steps >= 0, batch_size >= 1, lr > 0 (got {cfg.steps}, {cfg.batch_size}, {cfg.lr})")
    x = _as_images(forget_data)
    check_images(model, x)
    if cfg.eval_every and (evaluator is None or forget_class is None):
        raise ValueError("eval_every > 0 needs evaluator= and forget_class=")
    scheduler = scheduler if scheduler is not None else build_scheduler()
    unet = model if cfg.inplace else copy.deepcopy(model)
    dev = torch.device(cfg.device) if cfg.device else next(unet.parameters()).device
    unet.to(dev).train()
    null = null_class(unet)
    labels = None if null is None else torch.full((len(x),), null, dtype=torch.long)

    reg = None
    if method == "vdu" and cfg.stability == "posterior":
        post = _resolve_posterior(posterior, unet)
        reg = objectives.StabilityRegularizer(unet, post, cfg.center, cfg.normalization, cfg.var_floor)
    elif method == "vdu":
        reg = objectives.FunctionSpaceRegularizer(unet, scheduler, cfg.replay_samples, cfg.replay_ddim_steps,
                                                  cfg.replay_seed, null)
    weights = objectives.timestep_weights(scheduler, cfg.weighting, cfg.normalization)
    log = UnlearnLog(method, asdict(cfg))
    params = [p for p in unet.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    precond = None
    if cfg.precondition:
        if not isinstance(reg, objectives.StabilityRegularizer):
            raise ValueError("precondition=True needs method='vdu' with stability='posterior' (the posterior variances)")
        var = [0.5 / pr for pr in reg.prec]           # sigma*^2 (floored), in parameter order
        mean_var = sum(v.sum() for v in var) / sum(v.numel() for v in var)
        precond = [v / mean_var for v in var]         # relative mobility: mean 1, so lr keeps its meaning
    gen = torch.Generator().manual_seed(cfg.seed)
    probe = _Probe(x, scheduler, cfg, labels) if cfg.probe_every else None
    evaluate = make_evaluation(evaluator, forget_class, scheduler, cfg.eval_samples, cfg.eval_ddim_steps,
                               cfg.eval_seed, eval_reference) if cfg.eval_every else None
    good = [p.detach().clone() for p in params]      # last weights whose loss was finite and sane
    eval_good = None                                  # weights of the last evaluation that passed
    t0 = time.time()

    def restore(src):
        with torch.no_grad():
            for p, g in zip(params, src):
                p.copy_(g)

    def do_probe(step):
        rec = {"step": step, **probe(unet, with_nll=cfg.stop_nll_delta is not None)}
        log.probes.append(rec)
        return rec

    def do_eval(step):
        rec = {"step": step, **evaluate(unet)}
        log.evals.append(rec)
        return rec

    if probe is not None:
        p0 = do_probe(0)
    if evaluate is not None:
        do_eval(0)
        eval_good = [p.detach().clone() for p in params]
    init_forget = None
    n = len(x)
    bs = min(cfg.batch_size, n)
    per_epoch = max(1, n // bs)
    perm = None
    bar = tqdm(total=cfg.steps, desc=f"unlearn {method}", disable=not cfg.progress)
    step = 0
    while step < cfg.steps:
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            perm = torch.randperm(n, generator=gen)
        idx = perm[i * bs:(i + 1) * bs]
        xb = x[idx].to(dev)
        lb = None if labels is None else labels[idx].to(dev)
        if method == "vdu":
            out = objectives.vdu_loss(unet, scheduler, xb, reg, cfg.gamma, cfg.weighting, dataset_size=n,
                                      generator=gen, labels=lb, weights=weights)
        else:
            out = objectives.neggrad_loss(unet, scheduler, xb, generator=gen, labels=lb)
        loss = out["loss"]
        fl = out["forget_loss"].item()
        init_forget = fl if init_forget is None else init_forget
        vals = [loss.item(), out["A"].item(), out["B"].item()]
        bad = None
        if not all(math.isfinite(v) for v in vals + [fl]):
            bad = f"non-finite loss at step {step} (loss {vals[0]}, A {vals[1]}, B {vals[2]})"
        elif fl > cfg.explode_ratio * max(init_forget, 1e-8):
            bad = f"exploding forget loss at step {step}: {fl:.3g} > {cfg.explode_ratio:g} x initial {init_forget:.3g}"
        if bad is None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if precond is not None:
                for p, v in zip(params, precond):
                    p.grad.mul_(v)
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
            if not torch.isfinite(gn):
                bad = f"non-finite gradient norm at step {step}"
        if bad is not None:
            restore(good)
            msg = f"divergence guard: {bad}; stopped and restored the weights of step {log.steps_done}"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.events.append(msg)
            log.stop_reason = "diverged"
            break
        with torch.no_grad():
            for p, g in zip(params, good):
                g.copy_(p)
        opt.step()
        step += 1
        log.steps_done = step
        log.steps.append({"step": step, "loss": vals[0], "A": vals[1], "B": vals[2], "forget_loss": fl,
                          "grad_norm": gn.item()})
        bar.update(1)
        bar.set_postfix(loss=f"{vals[0]:.4g}", A=f"{vals[1]:.4g}", B=f"{vals[2]:.3g}")
        if probe is not None and (step % cfg.probe_every == 0 or step == cfg.steps):
            rec = do_probe(step)
            if cfg.stop_forget_ratio is not None and rec["forget_loss"] >= cfg.stop_forget_ratio * p0["forget_loss"]:
                log.stop_reason = "stop_rule"
                log.events.append(f"stop rule at step {step}: probe forget loss {rec['forget_loss']:.4g} >= "
                                  f"{cfg.stop_forget_ratio:g} x pretrained {p0['forget_loss']:.4g}")
                break
            if cfg.stop_nll_delta is not None and rec["forget_nll"] >= p0["forget_nll"] + cfg.stop_nll_delta:
                log.stop_reason = "stop_rule"
                log.events.append(f"stop rule at step {step}: forget NLL {rec['forget_nll']:.4g} bits/dim >= "
                                  f"pretrained {p0['forget_nll']:.4g} + {cfg.stop_nll_delta:g}")
                break
        if evaluate is not None and step % cfg.eval_every == 0:
            rec = do_eval(step)
            if cfg.collapse_confident_min is not None and rec["confident_share"] < cfg.collapse_confident_min:
                restore(eval_good)
                msg = (f"collapse guard at step {step}: confident share {rec['confident_share']:.2f} < "
                       f"{cfg.collapse_confident_min:g}; restored the weights of step {log.evals[-2]['step']}")
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                log.events.append(msg)
                log.stop_reason = "collapse"
                log.steps_done = log.evals[-2]["step"]
                break
            eval_good = [p.detach().clone() for p in params]
        if callback is not None and callback(step, unet, log):
            log.stop_reason = "callback"
            log.events.append(f"callback stopped the run at step {step}")
            break
    bar.close()
    log.wall_s = time.time() - t0
    unet.eval()
    unet.unlearn_log = log
    if cfg.save_to:
        save_unlearned(unet, scheduler, cfg.save_to, log)
    return unet


def save_unlearned(unet, scheduler, folder, log: UnlearnLog | None = None) -> Path:
    """Save an unlearned model as a pipeline folder (``save_pretrained`` layout, atomic) with
    ``unlearn.json`` (the config, stop reason and the per-step log)."""
    log = log if log is not None else getattr(unet, "unlearn_log", None)
    extra = {"unlearn": json.loads(json.dumps(log.to_dict(), default=float))} if log is not None else {}
    return save_model(unet, scheduler, folder, **extra)


def measure(unet, scheduler, evaluator, forget_class: int, retain_reference: torch.Tensor, n: int = 64,
            ddim_steps: int = 10, seed: int = 0, before: dict | None = None, forget_nll_images=None,
            retain_nll_images=None, nll_timesteps: int = 10, progress: bool = False) -> tuple[dict, torch.Tensor]:
    """The numbers methods.md §1/§4 ask for, always together: forget-class share, PUL (vs ``before``,
    the result of this function on the original model), confident share, u-FID (domain FID of ``n``
    seed-bank samples vs real retained-class images ``retain_reference``) and, when images are
    given, the forget / retain NLL bound in bits/dim. Returns (numbers, samples); ``numbers["labels"]``
    holds the evaluator labels (for PUL of later models)."""
    from .likelihood import nll_bits_per_dim
    from .metrics import class_histogram, domain_fid, pul
    from .sampling import sample

    x = sample(unet, scheduler, n, seed=seed, steps=ddim_steps, progress=progress)
    h = class_histogram(evaluator, x)
    out = {"n_samples": n, "ddim_steps": ddim_steps, "forget_share": h["shares"][forget_class],
           "confident_share": h["confident_share"], "counts": h["counts"],
           "u_fid": domain_fid(evaluator, x, retain_reference), "u_fid_reference": len(retain_reference),
           "labels": h["labels"]}
    if before is not None:
        try:
            out["pul"] = pul(before["labels"], h["labels"], forget_class)
        except ValueError:
            out["pul"] = float("nan")
    for key, imgs in (("forget_nll", forget_nll_images), ("retain_nll", retain_nll_images)):
        if imgs is not None:
            out[key] = nll_bits_per_dim(unet, scheduler, imgs, timesteps=nll_timesteps, seed=seed,
                                        progress=False).mean().item()
    return out, x
