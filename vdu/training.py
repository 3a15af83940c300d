"""Resumable DDPM pretraining with EMA and the K late snapshots VDU's posterior needs (docs/mathematics.md §0-§1).

One dataclass config per run (nanoGPT style). The run folder holds ``state.pt`` (written atomically
every ``checkpoint_every`` steps: weights, EMA, optimiser, LR schedule, RNG state, step), a JSONL log
and ``snapshots/`` (raw weights at the last ``k_snapshots`` multiples of ``snapshot_every``). Batches
are drawn from a per-epoch permutation seeded by (seed, epoch) and the noise from a saved generator,
so a killed run resumes to the same weights as an uninterrupted one (on the same device and thread
count).

Each new ``state.pt`` keeps the one it replaces as ``state.prev.pt``; a truncated or corrupt
``state.pt`` makes the resume fall back to it with a warning. A resume may change ``steps`` (the LR
schedule follows the new total); it refuses a changed learning rate or schedule, weight decay, clip,
EMA decay, data subset or architecture: the restored optimiser, schedule and EMA would ignore some of
them, and the others would make the run a mix of two configs.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import ImageData, load_dataset
from .diffusion import noise_prediction_error
from .models import (build_scheduler, build_unet, check_save_target, default_device, load_model, null_class,
                     save_model)


class ConfigError(ValueError):
    """A :class:`TrainConfig` value no run can use; ``field`` names it (the CLI turns it into ``--flag``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# Fields a resumed run restores from state.pt (optimiser, LR schedule, EMA) or that decide the
# architecture or the data: a different value on resume would be ignored or break the run, so it is refused.
RESUME_FIXED = ("lr", "warmup", "lr_final_frac", "weight_decay", "grad_clip", "ema_decay", "ema_warmup", "max_train",
                "canaries", "canary_repeat", "model_overrides", "loss_weighting", "snr_gamma")
LOSS_WEIGHTINGS = ("simple", "min-snr")
STATE_KEYS = ("model", "opt", "sched", "ema", "gen", "step", "wall_s", "config")


@dataclass
class TrainConfig:
    dataset: str = "mnist"            # vdu.data.SPECS key
    conditional: bool = False         # class-conditional UNet with a null class (classifier-free guidance)
    cond_drop: float = 0.1            # P(label -> null class) while training a conditional model
    steps: int = 20_000               # optimiser steps in total
    batch_size: int = 64
    lr: float = 1e-3                  # AdamW peak learning rate
    warmup: int = 500                 # linear warm-up steps, then cosine decay to lr_final_frac * lr
    lr_final_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9995         # EMA decay: the ceiling the warm-up (power 3/4) ramps up to, or the fixed decay
    ema_warmup: bool = True           # ramp the EMA decay up from 0 (off: ema_decay from step 2, for continuations)
    seed: int = 0
    checkpoint_every: int = 500       # atomic resumable state every N steps
    log_every: int = 50
    k_snapshots: int = 4              # K raw-weight snapshots at the end of the run (posterior, §1)
    snapshot_every: int = 500         # spacing of those snapshots in steps
    out: str = "runs/mnist-uncond"    # run folder
    export: str | None = None         # where the final EMA model folder goes (default: out/model)
    init: str | None = None           # start from this model folder's weights (continuations)
    data_root: str | None = None      # folder with the .npz files (default: vdu.data.data_root())
    max_train: int | None = None      # use only this many training images (smoke runs)
    canaries: int = 0                 # add this many marked training digits (vdu.canaries: a canary model; 0: none)
    canary_repeat: int = 1            # copies of each canary in the training set (how strongly they are memorised)
    model_overrides: dict = field(default_factory=dict)  # UNet2DModel kwargs on top of the preset
    mixed_precision: str = "no"       # "no" | "bf16": autocast of the forward pass (torch.autocast)
    grad_accum: int = 1               # micro-batches per step: each process's share of the batch is split into this
                                      # many chunks whose gradients add up (the same step in less memory)
    loss_weighting: str = "simple"    # "simple": L_simple; "min-snr": each image's error times min(SNR_t, snr_gamma) / SNR_t
    snr_gamma: float = 5.0            # the SNR above which "min-snr" down-weights a timestep (Hang et al., 2023)

    def command(self) -> str:
        """The ``python -m vdu pretrain`` command line that reproduces this config."""
        import shlex
        args = []
        for k, v in asdict(self).items():
            if k != "model_overrides" and v != getattr(TrainConfig, k, None):
                flag = "--" + k.replace("_", "-")
                args.append(flag if v is True else f"--no-{flag[2:]}" if v is False else f"{flag} {shlex.quote(str(v))}")
        if self.model_overrides:
            args.append(f"--model-overrides {shlex.quote(json.dumps(self.model_overrides))}")
        return " ".join(["python -m vdu pretrain"] + args)

    def check(self) -> "TrainConfig":
        """Raise a :class:`ConfigError` (a ValueError naming the field) for a value no run can use."""
        from .data import SPECS

        def bad(name, rule):
            value = getattr(self, name)
            raise ConfigError(name, f"{name} must be {rule}, got {value!r}")

        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(name, f"an integer >= {lo}")

        def number(name, ok, rule):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                bad(name, rule)

        if self.dataset not in SPECS:
            bad("dataset", f"one of {sorted(SPECS)}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "snapshot_every"):
            integer(name, 1)
        for name in ("warmup", "k_snapshots", "canaries"):
            integer(name, 0)
        integer("canary_repeat", 1)
        integer("grad_accum", 1)
        if self.batch_size % self.grad_accum:
            bad("grad_accum", f"a divisor of batch_size ({self.batch_size})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad("seed", "an integer")
        number("lr", lambda v: v > 0, "a number > 0")
        number("lr_final_frac", lambda v: 0 <= v <= 1, "in [0, 1] (the final LR as a fraction of lr)")
        number("weight_decay", lambda v: v >= 0, "a number >= 0")
        number("grad_clip", lambda v: v > 0, "a number > 0")
        number("cond_drop", lambda v: 0 <= v < 1, "in [0, 1) (the probability of dropping a label)")
        number("ema_decay", lambda v: 0 < v < 1, "in (0, 1)")
        for name in ("conditional", "ema_warmup"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        if self.max_train is not None:
            if isinstance(self.max_train, bool) or not isinstance(self.max_train, int) \
                    or self.max_train < self.batch_size:
                bad("max_train", f"None (all training images) or an integer >= batch_size ({self.batch_size})")
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out):
            bad("out", "a folder path")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            bad("loss_weighting", " or ".join(f'"{w}"' for w in LOSS_WEIGHTINGS))
        number("snr_gamma", lambda v: v > 0, "a number > 0")
        if self.mixed_precision not in ("no", "bf16"):
            bad("mixed_precision", '"no" or "bf16"')
        if not isinstance(self.model_overrides, dict):
            bad("model_overrides", "a dict of UNet2DModel keyword arguments")
        known = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
        if set(self.model_overrides) - known:
            bad("model_overrides", f"UNet2DModel keyword arguments; unknown: {sorted(set(self.model_overrides) - known)} "
                                   f"(e.g. block_out_channels, layers_per_block, down_block_types)")
        return self

    def snapshot_steps(self) -> list[int]:
        first = self.steps - (self.k_snapshots - 1) * self.snapshot_every
        return [s for s in range(first, self.steps + 1, self.snapshot_every) if s > 0][: self.k_snapshots]


def timestep_loss_weights(scheduler, weighting: str = "simple", snr_gamma: float = 5.0) -> torch.Tensor:
    """The weight of each 0-based timestep's noise-prediction error in the training loss: ones (L_simple), or
    Min-SNR-gamma's ``min(SNR_t, gamma) / SNR_t`` for an epsilon-predicting model (Hang et al., 2023): it leaves the
    noisy timesteps (SNR <= gamma) at 1 and caps the clean-image weight SNR_t that L_simple gives the nearly clean
    ones (docs/mathematics.md §0). A run's logged loss is the weighted one. (These weight pretraining's loss;
    :func:`vdu.diffusion.timestep_weights` are the weights C_t inside VDU's objective.)"""
    from diffusers.training_utils import compute_snr

    T = scheduler.config.num_train_timesteps
    if weighting == "simple":
        return torch.ones(T)
    if weighting != "min-snr":
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    snr = compute_snr(scheduler, torch.arange(T)).double()
    return (snr.clamp(max=snr_gamma) / snr).float()


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr_final_frac + (1 - cfg.lr_final_frac) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    return f


def _save_state(obj, state_path: Path) -> None:
    """Write ``state.pt`` atomically, keeping the one it replaces as ``state.prev.pt``: the new file is
    written completely beside it first, then the old one is renamed to ``state.prev.pt`` and the new
    one into place (a kill between the two renames leaves ``state.prev.pt`` alone, which resuming uses)."""
    tmp = state_path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if state_path.exists():
        os.replace(state_path, state_path.with_name("state.prev.pt"))
    os.replace(tmp, state_path)


def _read_state(path: Path) -> tuple[dict | None, str]:
    """(state, "") or (None, why it cannot be used) for one state file."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, garbage pickle, EOF, ...: all mean "unreadable"
        msg = (str(e).strip().splitlines() or ["unreadable"])[0].split(". ")[0]
        return None, f"{type(e).__name__}: {msg[:120]}"
    if not isinstance(st, dict) or any(k not in st for k in STATE_KEYS):
        return None, "not a training state (keys missing)"
    return st, ""


def load_state(run_dir: str | os.PathLike) -> tuple[dict | None, Path | None]:
    """The training state of ``run_dir`` and the file it came from; ``(None, None)`` for a new run.

    A ``state.pt`` that cannot be loaded (truncated, corrupt) or is missing beside a ``state.prev.pt``
    falls back, with a warning, to ``state.prev.pt`` (the checkpoint before it: the steps after it are
    trained again). When nothing can be loaded, a ValueError names the files and says what to do."""
    out = Path(run_dir)
    cur, prev = out / "state.pt", out / "state.prev.pt"
    if not cur.exists() and not prev.exists():
        return None, None
    why = "missing (the run stopped while replacing it)"
    if cur.exists():
        st, why = _read_state(cur)
        if st is not None:
            return st, cur
        if not prev.exists():
            raise ValueError(f"{cur} cannot be loaded ({why}): it is truncated or corrupt and there is no "
                             f"{prev.name} to fall back to. Delete {cur} to restart this run from step 0, or start "
                             f"a new run in another out folder (--out)")
    st, why_prev = _read_state(prev)
    if st is None:
        raise ValueError(f"cannot resume {out}: both checkpoints are unreadable (truncated or corrupt): {cur} ({why}) "
                         f"and {prev} ({why_prev}). Delete both to restart this run from step 0, or start a new run "
                         f"in another out folder (--out)")
    what = f"{cur} cannot be loaded ({why})" if cur.exists() else f"{cur} is {why}"
    warnings.warn(f"{what}: resuming from {prev} (step {st['step']}), the checkpoint before it; the steps after "
                  f"{st['step']} are trained again", RuntimeWarning, stacklevel=3)
    return st, prev


def _ema(unet, cfg: TrainConfig) -> EMAModel:
    """The EMA of a run: its decay at step t ramps up as 1 - t^(-3/4) to ``ema_decay``, or is ``ema_decay`` from the
    second step without warm-up (``min_decay``: diffusers' own no-warm-up rule is another ramp)."""
    return EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup, power=3 / 4,
                    min_decay=0.0 if cfg.ema_warmup else cfg.ema_decay)


def _check_resume(st: dict, cfg: TrainConfig, state_path: Path) -> None:
    """Refuse to resume with a config the checkpoint cannot honour (see :data:`RESUME_FIXED`)."""
    # a field the recording run's version did not have yet ran at its default
    rec = {**{f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}, **st["config"]}
    for k in ("dataset", "conditional", "batch_size", "seed"):
        if rec[k] != getattr(cfg, k):
            raise ValueError(f"{state_path} was made with {k}={rec[k]!r}, not {getattr(cfg, k)!r}: "
                             f"use another out folder or delete it")
    norm = lambda v: json.loads(json.dumps(v))  # tuples from Python, lists from JSON: the same config
    changed = [k for k in RESUME_FIXED if k in rec and norm(rec[k]) != norm(getattr(cfg, k))]
    if changed:
        diffs = "; ".join(f"{k}: recorded {rec[k]!r}, now {getattr(cfg, k)!r}" for k in changed)
        def flag(k):
            name, v = k.replace("_", "-"), rec[k]
            if isinstance(v, bool):
                return f"--{name}" if v else f"--no-{name}"
            return f"--{name} {v}" if v is not None else f"leave out --{name}"
        flags = " ".join(flag(k) for k in changed if k != "model_overrides")
        raise ValueError(
            f"cannot resume {state_path.parent} with a changed config ({diffs}): a resumed run restores its "
            f"optimiser, LR schedule, EMA and weights from {state_path.name}, so a new value would be ignored or "
            f"would make the run a mix of two configs. Resume with the recorded value{'s' if len(changed) > 1 else ''} "
            f"({', '.join(f'{k}={rec[k]!r}' for k in changed)}{'; on the command line: ' + flags if flags else ''}), "
            f"or train with the new one in a new run folder (another --out, optionally --init from an exported "
            f"model). Only steps may change on resume")
    if rec["steps"] != cfg.steps and cfg.steps < st["step"]:
        raise ValueError(f"{state_path} is already at step {st['step']} > steps={cfg.steps}")


def pretrain(cfg: TrainConfig, data: ImageData | None = None, until: int | None = None,
             device: str | torch.device | None = None, progress: bool = True, overwrite_export: bool = False) -> Path:
    """Train (or resume) the run in ``cfg.out``; returns the exported EMA model folder.

    ``until`` stops early after that step (a checkpoint is written), as an interruption would."""
    cfg.check()
    want = torch.device(device) if device else default_device()
    acc = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # launched by accelerate / torchrun: one of several processes
        from accelerate import Accelerator
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launched not in ("no", cfg.mixed_precision):
            warnings.warn(f"accelerate's mixed precision {launched!r} is ignored: the run's precision is its "
                          f"mixed_precision setting ({cfg.mixed_precision!r}; --mixed-precision on the command line)")
        acc = Accelerator(cpu=want.type == "cpu", mixed_precision="no")
    world, rank = (acc.num_processes, acc.process_index) if acc else (1, 0)
    main = acc is None or acc.is_main_process
    device = acc.device if acc else want              # one process: exactly the device asked for
    if cfg.mixed_precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(f"bf16 autocast on a CPU without native bfloat16 ({torch.backends.cpu.get_cpu_capability()}): "
                      f"it is emulated and far slower than float32 (a 2.7 M UNet step ~12x slower on an AVX2 CPU); "
                      f"use --mixed-precision no here")
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} cannot be split over {world} processes x {cfg.grad_accum} "
                         f"micro-batches: use a multiple of {world * cfg.grad_accum} (each process takes every "
                         f"{world}-th image of the global batch and splits its share into grad_accum chunks)")
    out = Path(cfg.out)
    st, st_file = load_state(out)           # refuse a bad resume before loading data or building the model
    if st is not None:
        _check_resume(st, cfg, st_file)
    if main:
        (out / "snapshots").mkdir(parents=True, exist_ok=True)
    data = data if data is not None else load_dataset(cfg.dataset, "train", cfg.data_root)
    full = data
    if cfg.max_train:
        data = data.take(cfg.max_train, seed=cfg.seed)
    if cfg.canaries:     # drawn from the whole training set, as vdu.canaries.canary_sets draws them for evaluation
        from .canaries import canary_sets
        marked, _ = canary_sets(full, cfg.canaries)
        data = ImageData(torch.cat([data.images, marked.images.repeat(cfg.canary_repeat, 1, 1, 1)]),
                   torch.cat([data.labels, marked.labels.repeat(cfg.canary_repeat)]), data.classes, data.name)
    n = len(data)
    if n < cfg.batch_size:
        raise ValueError(f"{n} training images is fewer than one batch of {cfg.batch_size}"
                         + (f" ({world} processes take {cfg.batch_size // world} each)" if world > 1 else ""))
    scheduler = build_scheduler()
    if cfg.init:
        unet, scheduler = load_model(cfg.init)
    else:
        torch.manual_seed(cfg.seed)
        unet = build_unet(cfg.dataset, cfg.conditional, **cfg.model_overrides)
    unet.to(device).train()
    t_weight = timestep_loss_weights(scheduler, cfg.loss_weighting, cfg.snr_gamma).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    ema = _ema(unet, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, wall = 0, 0.0
    state_path = out / "state.pt"
    if st is not None:
        if st_file != state_path and main:
            if state_path.exists():  # keep the unreadable file for inspection; never rotate it into state.prev.pt
                os.replace(state_path, out / "state.corrupt.pt")
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": st["step"], "resumed_from": st_file.name,
                                    "reason": "state.pt unreadable or missing"}) + "\n")
        if st["config"]["steps"] != cfg.steps and main:  # lengthen/shorten: the LR schedule follows the new total
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": st["step"], "steps_changed": [st["config"]["steps"], cfg.steps]}) + "\n")
        unet.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        ema.load_state_dict(st["ema"])
        gen.set_state(st["gen"])
        step, wall = st["step"], st["wall_s"]
    ema.to(device)
    if main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    # several processes (accelerate launch): DDP averages the gradients of the per-process shards, so a step
    # is the step of one process on the whole batch
    model = acc.prepare_model(unet) if acc else unet

    def save_state():
        if not main:
            return
        _save_state(dict(model=unet.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                         ema=ema.state_dict(), gen=gen.get_state(), step=step, wall_s=wall,
                         config=asdict(cfg)), state_path)

    per_epoch = n // cfg.batch_size
    perm, perm_epoch = None, -1
    snaps = set(cfg.snapshot_steps())
    null = null_class(unet)
    stop = min(cfg.steps, until) if until is not None else cfg.steps
    bar = tqdm(total=cfg.steps, initial=step, desc=f"pretrain {cfg.dataset}", disable=not (progress and main))
    log = open(out / "log.jsonl", "a") if main else None
    T = scheduler.config.num_train_timesteps
    mine = slice(rank, None, world)
    run_loss, t0 = 0.0, time.time()
    while step < stop:
        epoch, i = divmod(step, per_epoch)
        if epoch != perm_epoch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            perm_epoch = epoch
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        labels = None
        if null is not None:     # every process draws the whole batch's randomness, then takes its shard
            drop = torch.rand(len(idx), generator=gen) < cfg.cond_drop
            labels = torch.where(drop, torch.full_like(data.labels[idx], null), data.labels[idx])[mine].to(device)
        t = torch.randint(0, T, (len(idx),), generator=gen)
        eps = torch.randn((len(idx), *data.images.shape[1:]), generator=gen)
        x0, t, eps = data.images[idx[mine]].to(device), t[mine], eps[mine]
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        chunks = torch.arange(len(x0)).chunk(cfg.grad_accum)
        for j, c in enumerate(chunks):    # the batch mean as a weighted sum of chunk means; DDP syncs on the last
            sync = acc.no_sync(model) if acc and j < len(chunks) - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
                    err, tc = noise_prediction_error(model, scheduler, x0[c], None if labels is None else labels[c],
                                                     t=t[c], eps=eps[c])
                    part = (err.mean(1) * t_weight[tc]).mean() * (len(c) / len(x0))
                part.backward()
            loss = loss + part.detach()
        if acc:
            loss = acc.reduce(loss.detach(), "mean")
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        step += 1
        run_loss += loss.item()
        bar.update(1)
        if step in snaps and main:
            save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()},
                      out / "snapshots" / f"step_{step:07d}.safetensors")
        if step % cfg.log_every == 0 or step == stop:
            dt = time.time() - t0
            wall += dt
            k = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            rec = dict(step=step, loss=run_loss / k, lr=sched.get_last_lr()[0], img_per_s=k * cfg.batch_size / dt,
                       wall_s=round(wall, 1), processes=world)
            if main:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            run_loss, t0 = 0.0, time.time()
        if step % cfg.checkpoint_every == 0 or step == stop:
            save_state()
    bar.close()
    if main:
        log.close()
    if acc:
        acc.wait_for_everyone()
    if step >= cfg.steps:
        path = export_ema(out, cfg.export, device=str(device), overwrite=overwrite_export) if main else \
            Path(cfg.export) if cfg.export else out / "model"
        if acc:
            acc.wait_for_everyone()
        return path
    return out


def cpu_has_native_bf16() -> bool:
    """Whether torch has AVX-512 kernels here (where bfloat16 autocast can pay); on AVX2 alone it is emulated and slow."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def export_ema(run_dir: str | os.PathLike, to: str | os.PathLike | None = None, device: str = "cpu",
               overwrite: bool = False) -> Path:
    """Write the EMA weights held in ``run_dir/state.pt`` as a model folder (default ``run_dir/model``).

    Works on an unfinished run too: ``train.json`` records the step reached and the wall time. An
    existing model folder there is only replaced (whole, with its card and posterior) with ``overwrite=True``."""
    run_dir = Path(run_dir)
    target = check_save_target(Path(to) if to else run_dir / "model", overwrite)
    state_path = run_dir / "state.pt"
    if not state_path.exists():
        raise FileNotFoundError(f"{state_path} not found: nothing to export" + (
            " (state.prev.pt is there: resume the run with pretrain() first)"
            if (run_dir / "state.prev.pt").exists() else ""))
    st, why = _read_state(state_path)
    if st is None:
        raise ValueError(f"{state_path} cannot be loaded ({why}): it is truncated or corrupt. Resume the run "
                         f"(pretrain with the same config) to continue from state.prev.pt and rewrite it, then export")
    cfg = TrainConfig(**st["config"])
    unet = load_model(cfg.init)[0] if cfg.init else build_unet(cfg.dataset, cfg.conditional, **cfg.model_overrides)
    ema = _ema(unet, cfg)
    ema.load_state_dict(st["ema"])
    ema.copy_to(unet.parameters())
    return save_model(unet, build_scheduler(), target, overwrite=overwrite,
                      train={"config": st["config"], "steps": st["step"], "finished": st["step"] >= cfg.steps,
                             "wall_s": round(st["wall_s"], 1), "device": device,
                             "threads": torch.get_num_threads()})


def average_models(folders: list, to: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the uniform average of model folders' UNet weights as a model folder (a "model soup" of
    one training lineage: the EMA models a schedule left behind, averaged over a longer horizon than
    one run's EMA reaches). The folders must share one architecture and noise schedule, each named
    once; ``averaged.json`` names them."""
    if len(folders) < 2:
        raise ValueError(f"averaging needs at least two model folders, got {len(folders)}")
    if len({Path(f).resolve() for f in folders}) < len(folders):
        raise ValueError(f"a model folder is named twice in {[str(f) for f in folders]}: that is a weighted average")
    target = check_save_target(to, overwrite)

    def same(a, b):               # configs, not where the folders were read from
        return {k: v for k, v in a.config.items() if not k.startswith("_")} == \
            {k: v for k, v in b.config.items() if not k.startswith("_")}

    unet, sched = load_model(folders[0])
    states = [unet.state_dict()]
    for f in folders[1:]:
        other, other_sched = load_model(f)
        if not same(other, unet):
            raise ValueError(f"{f} is not the architecture of {folders[0]}: only one model's weights can be averaged")
        if not same(other_sched, sched):
            raise ValueError(f"{f} has another noise schedule than {folders[0]}: its weights predict other noise")
        states.append(other.state_dict())
    unet.load_state_dict({k: sum(s[k].double() for s in states) / len(states) for k in states[0]})
    return save_model(unet, sched, target, overwrite=overwrite,
                      averaged={"from": [str(f) for f in folders], "weights": "uniform"})


def snapshot_files(run_dir: str | os.PathLike) -> list[Path]:
    """The K snapshot files of a run, oldest first."""
    return sorted((Path(run_dir) / "snapshots").glob("step_*.safetensors"))
