"""The one loop every unlearning method shares: ``unlearn(model, data, method=..., **options)``.

    from vdu.unlearning import unlearn
    model = unlearn(unet, forget_images, method="vdu", scheduler=scheduler,
                    posterior="checkpoints/mnist/ddpm/posterior.safetensors", gamma=0.5, steps=100)
    model.unlearn_log.summary()        # the method's terms per step; probes; evaluations; why it stopped

A method (``vdu.methods``, looked up by name) supplies its loss; this loop owns what all methods share,
configured by :class:`LoopConfig`: batching of D_f (and D_r for methods that need it), the optimiser,
the stop rule, the divergence and collapse guards, probes, evaluation, logging and saving. Options
passed to ``unlearn`` go to the loop or to the method's own config by name; an option of another
method raises, naming the method it belongs to.

Works on any diffusers ``UNet2DModel`` (ours or a user's; unconditional or with a class embedding, in
which case a forget class is the prompt: the forget images are conditioned on it, and methods such as
ESD and Selective Amnesia use it; without a forget class the null class is used).

What makes a run robust (docs/mathematics.md §1 hazards: the forget loss is unbounded above, the useful strength
range is narrow, a collapsed model can look like forgetting):

- **Stop rule** (the likelihood-constraint view of docs/mathematics.md §2, LU: ``E_{D_f}[-log p] >= b``):
  every ``probe_every`` steps the forget-set denoising loss is measured on a *fixed* probe (fixed
  images, t and eps, so the numbers are comparable along the run), and optionally the NLL bound in
  bits/dim. The run stops as soon as the probe loss reaches ``stop_forget_ratio`` times its
  pretrained value, or the forget NLL rises by ``stop_nll_delta`` bits/dim.
- **Divergence guard**: a non-finite loss, logged term or gradient, or a forget loss above
  ``explode_ratio`` times its initial value, stops the run, restores the last weights whose loss was
  finite and sane, warns, and records the event. The result of the last step is checked too (one
  probe after the loop), and non-finite monitoring samples count as divergence.
- **Constrained methods** (docs/mathematics.md §2: ``ru``, ``vdu`` with ``forget_ratio``) update their
  multipliers after each step (``Method.after_step``); the loop logs them in ``log.duals`` and stops
  the run as ``infeasible`` when a multiplier has run to the edge of its domain with the constraint
  still violated (``vdu.primal_dual.InfeasibleConstraint``).
- **Quality monitoring** (optional, needs an evaluator and a forget class): every ``eval_every``
  steps, samples from a fixed seed bank give the forget-class share, PUL and the confident share
  (``vdu.evaluation``); with ``collapse_confident_min`` the run stops and restores the previous
  evaluation's weights when the confident share drops below it (blank samples are not unlearning).

**Several processes** (``accelerate launch -m vdu unlearn ...`` or a script that calls ``unlearn``, on GPUs
or CPU processes): each step's forget (and retain) batch of ``batch_size`` images is split over the k
processes, each draws its own t and eps, and the gradients are averaged (each method's ``backward``), so a
step is one step on the whole batch, as in one process; the logged terms, the stop rule, the guards and
the dual updates use the mean over the processes, so every process takes the same decisions and holds
the same weights. One process saves. ``mixed_precision="bf16"`` runs the method's forward passes under
bfloat16 autocast.
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

from .data import UnlearnData
from .diffusion import nll_bits_per_dim, noise_prediction_error
from .evaluation import EvalConfig, evaluate
from .methods import REGISTRY, Batch, get_method
from .methods.base import mean_over_processes
from .models import build_scheduler, check_images, check_save_target, null_class, save_model
from .primal_dual import InfeasibleConstraint

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class LoopConfig:
    # --- optimisation ---
    steps: int = 100                  # maximum optimiser steps (the stop rule may end the run earlier)
    batch_size: int = 64              # forget images per step (fewer if the forget set is smaller); same for D_r
    lr: float = 1e-4                  # learning rate (constant)
    optimizer: str = "adamw"          # "adamw" or "sgd" (plain gradient steps: the move is proportional to the gradient)
    weight_decay: float = 0.0         # weight decay (0: only the method pulls towards theta*)
    grad_clip: float | None = 1.0     # gradient-norm clip (None: off)
    mixed_precision: str = "no"       # "no" | "bf16": the method's forward passes under bfloat16 autocast
    grad_accum: int = 1               # micro-batches per step: the (per-process) batch is split into this many chunks
                                      # whose gradients add up, for methods whose loss is a batch mean (less memory)
    seed: int = 0                     # batches, t and eps of the run and of the probe
    # --- stop rule (likelihood constraint, docs/mathematics.md §2) ---
    probe_every: int = 5              # measure the fixed forget probe every N steps (0: never; the end is always checked)
    probe_size: int = 64              # forget images in the probe
    stop_forget_ratio: float | None = None  # stop when probe L_simple >= ratio * pretrained value
    stop_nll_delta: float | None = None     # stop when probe forget NLL bound rises by this many bits/dim
    nll_timesteps: int = 10           # stratified t-terms of the probe NLL bound (only if stop_nll_delta)
    nll_images: int = 16              # probe images for the NLL bound
    # --- divergence guard ---
    explode_ratio: float = 1e3        # diverged if the batch forget loss > ratio * its initial value
    # --- quality monitoring (optional; needs evaluator and a forget class) ---
    eval_every: int = 0               # evaluate PUL + confident share every N steps (0: never)
    eval_samples: int = 64            # seed-bank samples per evaluation
    eval_ddim_steps: int = 10         # DDIM steps of those samples
    eval_seed: int = 0                # seed bank of the evaluation samples
    collapse_confident_min: float | None = None  # stop + restore if the confident share falls below this
    # --- misc ---
    inplace: bool = False             # modify ``model`` itself instead of a deep copy
    progress: bool = True             # tqdm progress bar
    device: str | None = None         # default: the model's device
    save_to: str | None = None        # save the unlearned model folder here (checked before the run starts)
    overwrite: bool = False           # allow save_to to replace a model folder that already exists

    def check(self) -> "LoopConfig":
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f'mixed_precision must be "no" or "bf16", got {self.mixed_precision!r}')
        ints = ("steps", "batch_size", "probe_every", "probe_size", "nll_timesteps", "nll_images", "eval_every",
                "eval_samples", "eval_ddim_steps", "grad_accum")
        for k in ints:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{k} must be an integer, got {v!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        for k in ("batch_size", "probe_size", "nll_timesteps", "nll_images", "eval_samples", "eval_ddim_steps",
                  "grad_accum"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.probe_every < 0 or self.eval_every < 0:
            raise ValueError("probe_every and eval_every must be >= 0 (0: off)")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if not self.explode_ratio > 1:
            raise ValueError(f"explode_ratio must be > 1, got {self.explode_ratio!r}")
        for k in ("stop_forget_ratio", "stop_nll_delta", "collapse_confident_min"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{k} must be a number or None, got {v!r}")
        return self

    def monitor(self) -> EvalConfig:
        return EvalConfig(n_samples=self.eval_samples, steps=self.eval_ddim_steps, seed=self.eval_seed, nll_timesteps=0,
                          bootstrap=0, fid_bootstrap=0)


@dataclass
class UnlearnLog:
    """What happened: the method's terms per step; probes; evaluations; the stop reason."""

    method: str
    config: dict
    steps: list = field(default_factory=list)      # {"step", "loss", <method terms>, "forget_loss", "grad_norm"}
    probes: list = field(default_factory=list)     # {"step", "forget_loss"[, "forget_nll"]}
    evals: list = field(default_factory=list)      # {"step", "forget_share", "pul", "confident_share", ...}
    duals: list = field(default_factory=list)      # constrained methods: {"step", "lam", "violations", ...} per dual step
    events: list = field(default_factory=list)     # human-readable notes (divergence, stop, restore)
    stop_reason: str = "max_steps"                 # max_steps | stop_rule | diverged | collapse | infeasible | callback
    steps_done: int = 0                            # optimiser steps whose result was kept
    wall_s: float = 0.0
    processes: int = 1                             # processes that shared each batch (accelerate launch)

    def summary(self) -> dict:
        last = self.probes[-1] if self.probes else {}
        first = self.probes[0] if self.probes else {}
        return {"method": self.method, "stop_reason": self.stop_reason, "steps_done": self.steps_done,
                "wall_s": round(self.wall_s, 2), "forget_loss_start": first.get("forget_loss"),
                "forget_loss_end": last.get("forget_loss"), "forget_nll_start": first.get("forget_nll"),
                "forget_nll_end": last.get("forget_nll"), "events": self.events, "config": self.config,
                **({"lam_end": self.duals[-1]["lam"]} if self.duals else {})}

    def to_dict(self) -> dict:
        return asdict(self)


def split_options(method: str, options: dict, method_config=None) -> tuple[dict, object]:
    """Split ``unlearn`` keyword options into loop fields and the method's config. A field of another
    method, or of none, raises a TypeError naming where it belongs."""
    cls = get_method(method)
    loop_names = {f.name for f in fields(LoopConfig)}
    own = {f.name for f in fields(cls.Config)}
    loop, mine = {}, {}
    for k, v in options.items():
        if k in loop_names:
            loop[k] = v
        elif k in own:
            mine[k] = v
        else:
            owners = sorted(n for n, m in REGISTRY.items() if k in {f.name for f in fields(m.Config)})
            if owners:
                raise TypeError(f"option {k!r} belongs to method(s) {owners}, not to {method!r}; "
                                f"{method!r} takes {sorted(own) or 'no options'} (+ the loop's LoopConfig fields)")
            raise TypeError(f"unknown unlearn option {k!r}; the loop takes {sorted(loop_names)}, method {method!r} "
                            f"takes {sorted(own) or 'no options'}")
    mcfg = copy.deepcopy(method_config) if method_config is not None else cls.Config()
    if not isinstance(mcfg, cls.Config):
        raise TypeError(f"method_config must be a {cls.Config.__name__} for method {method!r}, got {type(mcfg).__name__}")
    for k, v in mine.items():
        setattr(mcfg, k, v)
    return loop, mcfg


class _Probe:
    """Fixed forget images, t and eps: the forget loss along the run, comparable across steps."""

    def __init__(self, x, scheduler, cfg: LoopConfig, labels):
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
        lab = None if self.labels is None else self.labels.to(dev)
        sq, _ = noise_prediction_error(unet, self.scheduler, self.x.to(dev), lab, t=self.t, eps=self.eps)
        out = {"forget_loss": sq.mean(1).mean().item()}
        if with_nll:
            lab = None if self.labels is None else self.labels[: len(self.nll_x)]
            out["forget_nll"] = nll_bits_per_dim(unet, self.scheduler, self.nll_x, class_labels=lab,
                                                 timesteps=self.cfg.nll_timesteps, seed=self.cfg.seed,
                                                 progress=False).mean().item()
        unet.train(was)
        return out


def _needs(cls, data: UnlearnData, null, posterior) -> None:
    if "retain" in cls.needs and data.retain is None:
        raise ValueError(f"method {cls.name!r} needs retain data (D_r): pass UnlearnData(forget, retain=...); "
                         f"the forget-only methods are {sorted(n for n, m in REGISTRY.items() if 'retain' not in m.needs)}")
    if "conditional" in cls.needs:
        if null is None:
            raise ValueError(f"method {cls.name!r} conditions on the forgotten class: it needs a class-conditional "
                             f"model, and this one is unconditional")
        if data.forget_class is None:
            raise ValueError(f"method {cls.name!r} needs the forget class (the prompt to erase): "
                             f"pass UnlearnData(..., forget_class=c)")
    if null is not None and data.forget_class is not None and not 0 <= data.forget_class < null:
        raise ValueError(f"forget_class {data.forget_class} is not a class of this model (0..{null - 1})")
    if "posterior" in cls.needs and posterior is None:
        raise ValueError(f"method {cls.name!r} needs a weight posterior: pass posterior=")


def _processes(device: str | None, model_device: torch.device) -> tuple[int, int, torch.device]:
    """(number of processes, this one's index, its device). Several only when started by ``accelerate launch``
    or torchrun (WORLD_SIZE > 1): then accelerate sets up the process group and gives each process its device
    (its own GPU, or the CPU when ``device`` says cpu or there is no GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0, torch.device(device) if device else model_device
    from accelerate import PartialState
    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"started as one of {os.environ['WORLD_SIZE']} processes, but accelerate set up "
                           f"{state.num_processes}: check the accelerate config (accelerate env)")
    return state.num_processes, state.process_index, state.device


def _shard_sizes(bs: int, world: int, what: str, accum: int = 1) -> None:
    if world > 1 and bs % world:
        raise ValueError(f"a {what} batch of {bs} images cannot be split over {world} processes: make batch_size a "
                         f"multiple of {world} (and give at least {world} {what} images), or run fewer processes")
    if (bs // world) % accum:
        raise ValueError(f"a {what} batch of {bs // world} images per process cannot be split into grad_accum={accum} "
                         f"equal micro-batches: make batch_size a multiple of {world * accum} (and give at least "
                         f"{world * accum} {what} images)")


def unlearn(model, data, method: str = "vdu", scheduler=None, *, posterior=None, config: LoopConfig | None = None,
            method_config=None, evaluator=None, callback: Callable | None = None, **options):
    """Unlearn with ``method`` (a name of ``vdu.methods.REGISTRY``) from a diffusers UNet.

    ``data``: a :class:`vdu.data.UnlearnData` (forget images, optional retain images and labels, the forget
    class, evaluation references) or simply the forget images (ImageData or an (N, C, H, W) tensor in
    [-1, 1]). ``scheduler``: the model's DDPM noise schedule (default ``build_scheduler()``).
    ``posterior``: a posterior file or dict (VDU's B). ``config`` / ``method_config``: a
    :class:`LoopConfig` / the method's ``Config``; ``**options`` override fields of either by name.
    ``evaluator`` turns on the evaluations of ``eval_every`` (with u-FID when ``data.reference`` is set);
    ``callback(step, model, log)`` is called after every step and may return True to stop.
    Returns the unlearned model (in eval mode) with ``model.unlearn_log`` (:class:`UnlearnLog`).
    """
    cls = get_method(method)
    loop_opts, mcfg = split_options(method, options, method_config)
    cfg = copy.deepcopy(config) if config is not None else LoopConfig()
    for k, v in loop_opts.items():
        setattr(cfg, k, v)
    cfg.check()
    data = UnlearnData.of(data)
    x = data.forget
    check_images(model, x)
    if data.retain is not None:
        check_images(model, data.retain)
    if cfg.eval_every and (evaluator is None or data.forget_class is None):
        raise ValueError("eval_every > 0 needs evaluator= and a forget class (UnlearnData(..., forget_class=c))")
    _needs(cls, data, null_class(model), posterior)
    if cfg.save_to:
        check_save_target(cfg.save_to, cfg.overwrite)        # fail now, not after the run
    scheduler = scheduler if scheduler is not None else build_scheduler()
    world, rank, dev = _processes(cfg.device, next(model.parameters()).device)
    bs = min(cfg.batch_size, len(x))
    if cfg.grad_accum > 1 and not cls.accumulates(mcfg):
        raise ValueError(f"method {method!r} with these options combines its batch non-linearly (per-group means, "
                         f"rescaled gradients), so micro-batches do not add up to its step: use grad_accum=1")
    _shard_sizes(bs, world, "forget", cfg.grad_accum)
    if "retain" in cls.needs:
        _shard_sizes(min(bs, len(data.retain)), world, "retain", cfg.grad_accum)
    unet = model if cfg.inplace else copy.deepcopy(model)
    unet.to(dev).train()
    null = null_class(unet)
    concept = data.forget_class if data.forget_class is not None else null
    labels = None if null is None else torch.full((len(x),), concept, dtype=torch.long)
    r_labels = None
    if null is not None and data.retain is not None:
        r_labels = data.retain_labels if data.retain_labels is not None else torch.full((len(data.retain),), null)
    m = cls(unet, data, mcfg, scheduler, null, posterior)

    log = UnlearnLog(method, {**asdict(cfg), **asdict(mcfg)}, processes=world)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.SGD)(params, lr=cfg.lr,
                                                                               weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    gen_r = torch.Generator().manual_seed(cfg.seed + 1)       # retain batches: their own stream
    # the method's draws (t, eps, ...): in one process the batch stream itself; with several, each process its own
    gen_m = gen if world == 1 else torch.Generator().manual_seed(step_seed(cfg.seed, rank))
    mine = slice(rank, None, world)                            # this process's share of every batch
    probe = _Probe(x, scheduler, cfg, labels)
    monitor = cfg.monitor()
    good = [p.detach().clone() for p in params]      # last weights whose loss was finite and sane
    eval_good = None                                  # weights of the last evaluation that passed
    t0 = time.time()

    def restore(src):
        with torch.no_grad():
            for p, g in zip(params, src):
                p.copy_(g)

    def agreed(rec: dict) -> dict:
        """With several processes: the mean of each number over them, so that every process takes the same
        stop decision from it (they compute the same probe on the same weights; this rules out a rounding
        difference on one device ending the run there alone)."""
        if world == 1:
            return rec
        keys = [k for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"]
        t = torch.tensor([float(rec[k]) for k in keys], dtype=torch.float64, device=dev)
        mean_over_processes([t])
        return {**rec, **dict(zip(keys, t.tolist()))}

    def do_probe(step):
        rec = {"step": step, **agreed(probe(unet, with_nll=cfg.stop_nll_delta is not None))}
        log.probes.append(rec)
        return rec

    first = {}                                        # the step-0 evaluation's labels (PUL is counted against them)

    def do_eval(step):
        out, _ = evaluate(unet, scheduler, evaluator, monitor, data, before=first or None, nll=False)
        if not first:
            first["labels"], out["pul"] = out["labels"], 0.0
        rec = {"step": step, **agreed({k: v for k, v in out.items() if k not in ("labels", "counts")})}
        log.evals.append(rec)
        return rec

    def diverged(msg, src, step_kept):
        restore(src)
        msg = f"divergence guard: {msg}; stopped and restored the weights of step {step_kept}"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log.events.append(msg)
        log.stop_reason = "diverged"
        log.steps_done = step_kept

    p0 = do_probe(0) if cfg.probe_every else agreed(probe(unet, with_nll=False))
    if evaluator is not None and cfg.eval_every:
        do_eval(0)
        eval_good = [p.detach().clone() for p in params]
    init_forget = None
    n = len(x)
    per_epoch = max(1, n // bs)
    perm = None
    nr = 0 if data.retain is None else len(data.retain)
    r_perm, r_i = None, 0
    bar = tqdm(total=cfg.steps, desc=f"unlearn {method}", disable=not cfg.progress or rank > 0)
    step = 0
    while step < cfg.steps:
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            perm = torch.randperm(n, generator=gen)
        idx = perm[i * bs:(i + 1) * bs]
        rb = rl = None
        if "retain" in cls.needs:
            rbs = min(bs, nr)
            if r_perm is None or r_i + rbs > nr:
                r_perm, r_i = torch.randperm(nr, generator=gen_r), 0
            ridx = r_perm[r_i:r_i + rbs]
            r_i += rbs
            ridx = ridx[mine]
            rb = data.retain[ridx].to(dev)
            rl = None if r_labels is None else r_labels[ridx].to(dev)
        idx = idx[mine]
        rparts = [None] * cfg.grad_accum if rb is None else torch.arange(len(rb)).chunk(cfg.grad_accum)
        parts = [Batch(x[i].to(dev), None if labels is None else labels[i].to(dev),
                       None if j is None else rb[j], None if j is None or rl is None else rl[j], gen_m, n, i)
                 for i, j in zip(idx.chunk(cfg.grad_accum), rparts)]
        if cfg.grad_accum > 1:       # each micro-batch's backward now; the terms are the chunk means' mean
            opt.zero_grad(set_to_none=True)
            out = _accumulate(m, unet, parts, cfg.mixed_precision == "bf16", dev)
        else:
            with torch.autocast(dev.type, torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
                out = m.loss(unet, parts[0])
        seen = _mean_terms(out) if world > 1 else out     # what the logs, guards and duals see: the batch mean
        terms = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in seen.items()
                 if k not in ("loss", "forget_loss") and not k.startswith("_")}
        fl, loss_value = _number(seen["forget_loss"]), _number(seen["loss"])
        init_forget = fl if init_forget is None else init_forget
        bad = None
        if not all(math.isfinite(v) for v in [loss_value, fl, *terms.values()]):
            bad = f"non-finite loss at step {step + 1} (loss {loss_value}, " + \
                  ", ".join(f"{k} {v}" for k, v in terms.items()) + ")"
        elif fl > cfg.explode_ratio * max(init_forget, 1e-8):
            bad = f"exploding forget loss at step {step + 1}: {fl:.3g} > {cfg.explode_ratio:g} x initial {init_forget:.3g}"
        if bad is None:
            if cfg.grad_accum > 1:
                mean_over_processes([p.grad for p in params])
            else:
                opt.zero_grad(set_to_none=True)
                m.backward(out, params)
            m.transform_grads(params)
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
            if not torch.isfinite(gn):
                bad = f"non-finite gradient norm at step {step + 1}"
        if bad is not None:
            # ``good`` holds the weights before the last kept step: its loss was the last one seen sane
            diverged(bad, good, max(log.steps_done - 1, 0))
            break
        with torch.no_grad():
            for p, g in zip(params, good):
                g.copy_(p)
        opt.step()
        step += 1
        log.steps_done = step
        log.steps.append({"step": step, "loss": loss_value, **terms, "forget_loss": fl, "grad_norm": gn.item()})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4g}", forget=f"{fl:.4g}")
        try:
            dual = m.after_step(unet, step, seen)
        except InfeasibleConstraint as e:
            msg = f"infeasible constraint at step {step}: {e}"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.events.append(msg)
            log.duals.append({"step": step, "lam": e.lam.tolist(), "violations": e.violation.tolist(),
                              "infeasible": int(e.index)})
            log.stop_reason = "infeasible"
            break
        if dual is not None:
            log.duals.append(dual)
        if cfg.probe_every and (step % cfg.probe_every == 0 or step == cfg.steps):
            rec = do_probe(step)
            if not math.isfinite(rec["forget_loss"]) or rec["forget_loss"] > cfg.explode_ratio * p0["forget_loss"]:
                diverged(f"probe forget loss {rec['forget_loss']:.3g} after step {step}", good, step - 1)
                break
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
        if eval_good is not None and step % cfg.eval_every == 0:
            try:
                rec = do_eval(step)
            except FloatingPointError as e:
                diverged(f"monitoring at step {step}: {e}", eval_good, log.evals[-1]["step"])
                break
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
        if callback is not None and agreed({"stop": float(bool(callback(step, unet, log)))})["stop"] > 0:
            log.stop_reason = "callback"
            log.events.append(f"callback stopped the run at step {step}")
            break
    bar.close()
    if log.stop_reason == "max_steps" and step > 0 and not cfg.probe_every:
        # the last step's result is checked like every other one
        end = agreed(probe(unet, with_nll=False))["forget_loss"]
        if not math.isfinite(end) or end > cfg.explode_ratio * p0["forget_loss"]:
            diverged(f"forget loss {end:.3g} after the last step (x{end / p0['forget_loss']:.3g} the pretrained "
                     f"model's)", good, step - 1)
    log.wall_s = time.time() - t0
    unet.eval()
    unet.unlearn_log = log
    if cfg.save_to and rank == 0:
        save_unlearned(unet, scheduler, cfg.save_to, log, overwrite=cfg.overwrite)
    if world > 1:
        torch.distributed.barrier()          # the folder is complete before any process returns
    return unet


def _number(v) -> float:
    return float(v.detach()) if torch.is_tensor(v) else float(v)


def step_seed(seed: int, rank: int) -> int:
    """Seed of process ``rank``'s draws (t, eps, ...) in a run of several processes."""
    return seed + 1_000_003 * (rank + 1)


def _accumulate(m, unet, parts: list, bf16: bool, dev) -> dict:
    """Gradient accumulation: the backward of each equal micro-batch's loss / len(parts) adds into ``p.grad``
    (the method's loss is a batch mean, ``Method.accumulates``); returns the step's terms, the chunks' mean."""
    out = {}
    for b in parts:
        with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
            o = m.loss(unet, b)
        (o["loss"] / len(parts)).backward()
        for k, v in o.items():
            v = (v.detach() if torch.is_tensor(v) else v) / len(parts)
            out[k] = v if k not in out else out[k] + v
    return out


def _mean_terms(out: dict) -> dict:
    """The step's tensors (loss, forget loss, terms, the duals' statistics) averaged over the processes;
    detached copies, so the method's backward still sees its own graph."""
    seen = {k: (v.detach().clone() if v.is_floating_point() else v.detach().double()) if torch.is_tensor(v) else v
            for k, v in out.items()}
    mean_over_processes([v for v in seen.values() if torch.is_tensor(v)])
    return seen


def save_unlearned(unet, scheduler, folder, log: UnlearnLog | None = None, overwrite: bool = False) -> Path:
    """Save an unlearned model as a pipeline folder (``save_pretrained`` layout, atomic) with
    ``unlearn.json`` (the config, stop reason and the per-step log)."""
    log = log if log is not None else getattr(unet, "unlearn_log", None)
    extra = {"unlearn": json.loads(json.dumps(log.to_dict(), default=float))} if log is not None else {}
    if hasattr(unet, "save_pipeline"):          # a text-to-image model (vdu.text2image): its whole pipeline
        return unet.save_pipeline(folder, scheduler, overwrite=overwrite, **extra)
    return save_model(unet, scheduler, folder, overwrite=overwrite, **extra)
