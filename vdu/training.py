"""Resumable DDPM pretraining with EMA and the K late snapshots VDU's posterior needs (methods.md §0-§1).

One dataclass config per run (nanoGPT style). The run folder holds ``state.pt`` (written atomically
every ``checkpoint_every`` steps: weights, EMA, optimiser, LR schedule, RNG state, step), a JSONL log
and ``snapshots/`` (raw weights at the last ``k_snapshots`` multiples of ``snapshot_every``). Batches
are drawn from a per-epoch permutation seeded by (seed, epoch) and the noise from a saved generator,
so a killed run resumes to the same weights as an uninterrupted one (on the same device and thread
count).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import ImageData, load_dataset
from .models import (build_scheduler, build_unet, check_save_target, default_device, load_model, null_class,
                     save_model)


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
    ema_decay: float = 0.9995         # EMA ceiling; EMA warm-up (power 3/4) ramps up to it
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
    model_overrides: dict = field(default_factory=dict)  # UNet2DModel kwargs on top of the preset

    def command(self) -> str:
        """The ``python -m vdu pretrain`` command line that reproduces this config."""
        args = []
        for k, v in asdict(self).items():
            if k != "model_overrides" and v != getattr(TrainConfig, k, None):
                flag = "--" + k.replace("_", "-")
                args.append(flag if v is True else f"--no-{flag[2:]}" if v is False else f"{flag} {v}")
        return " ".join(["python -m vdu pretrain"] + args)

    def snapshot_steps(self) -> list[int]:
        first = self.steps - (self.k_snapshots - 1) * self.snapshot_every
        return [s for s in range(first, self.steps + 1, self.snapshot_every) if s > 0][: self.k_snapshots]


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr_final_frac + (1 - cfg.lr_final_frac) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    return f


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def forward_noise(scheduler, x0, generator=None, t=None, eps=None):
    """The forward process of methods.md §0: ``(x_t, t, eps)`` with t ~ U{0..T-1} (0-based scheduler
    indices) and eps ~ N(0, I) drawn from ``generator`` (t first) unless given."""
    g_dev = generator.device if generator is not None else x0.device
    if t is None:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator, device=g_dev)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=g_dev)
    t, eps = t.to(x0.device), eps.to(x0.device)
    return scheduler.add_noise(x0, eps, t), t, eps


def noise_prediction_error(unet, scheduler, x0, labels=None, generator=None, t=None, eps=None):
    """Per-pixel ``(eps - eps_theta(x_t, t))^2`` of methods.md §0, shape (batch, pixels), and the t used
    (t and eps as in :func:`forward_noise`)."""
    xt, t, eps = forward_noise(scheduler, x0, generator, t, eps)
    pred = unet(xt, t, class_labels=labels).sample
    return F.mse_loss(pred.float(), eps, reduction="none").flatten(1), t


def denoising_loss(unet, scheduler, x0, labels=None, generator=None, reduction="mean"):
    """L_simple of methods.md §0: ``||eps - eps_theta(x_t, t)||^2`` with t ~ U{1..T}, eps ~ N(0, I).

    ``reduction='none'`` returns one value per image (mean over pixels)."""
    per = noise_prediction_error(unet, scheduler, x0, labels, generator)[0].mean(1)
    return per.mean() if reduction == "mean" else per


def pretrain(cfg: TrainConfig, data: ImageData | None = None, until: int | None = None,
             device: str | torch.device | None = None, progress: bool = True) -> Path:
    """Train (or resume) the run in ``cfg.out``; returns the exported EMA model folder.

    ``until`` stops early after that step (a checkpoint is written), as an interruption would."""
    device = torch.device(device) if device else default_device()
    out = Path(cfg.out)
    (out / "snapshots").mkdir(parents=True, exist_ok=True)
    data = data if data is not None else load_dataset(cfg.dataset, "train", cfg.data_root)
    if cfg.max_train:
        data = data.take(cfg.max_train, seed=cfg.seed)
    n = len(data)
    if n < cfg.batch_size:
        raise ValueError(f"{n} training images is fewer than one batch of {cfg.batch_size}")
    scheduler = build_scheduler()
    if cfg.init:
        unet, scheduler = load_model(cfg.init)
    else:
        torch.manual_seed(cfg.seed)
        unet = build_unet(cfg.dataset, cfg.conditional, **cfg.model_overrides)
    unet.to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, wall = 0, 0.0
    state_path = out / "state.pt"
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        for k in ("dataset", "conditional", "batch_size", "seed"):
            if st["config"][k] != getattr(cfg, k):
                raise ValueError(f"{state_path} was made with {k}={st['config'][k]!r}, not {getattr(cfg, k)!r}: "
                                 f"use another out folder or delete it")
        if st["config"]["steps"] != cfg.steps:  # lengthen/shorten a run: the LR schedule follows the new total
            if cfg.steps < st["step"]:
                raise ValueError(f"{state_path} is already at step {st['step']} > steps={cfg.steps}")
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": st["step"], "steps_changed": [st["config"]["steps"], cfg.steps]}) + "\n")
        unet.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        ema.load_state_dict(st["ema"])
        gen.set_state(st["gen"])
        step, wall = st["step"], st["wall_s"]
    ema.to(device)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    def save_state():
        _atomic_torch_save(dict(model=unet.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                                ema=ema.state_dict(), gen=gen.get_state(), step=step, wall_s=wall,
                                config=asdict(cfg)), state_path)

    per_epoch = n // cfg.batch_size
    perm, perm_epoch = None, -1
    snaps = set(cfg.snapshot_steps())
    null = null_class(unet)
    stop = min(cfg.steps, until) if until is not None else cfg.steps
    bar = tqdm(total=cfg.steps, initial=step, desc=f"pretrain {cfg.dataset}", disable=not progress)
    log = open(out / "log.jsonl", "a")
    run_loss, t0 = 0.0, time.time()
    while step < stop:
        epoch, i = divmod(step, per_epoch)
        if epoch != perm_epoch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            perm_epoch = epoch
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        x0 = data.images[idx].to(device)
        labels = None
        if null is not None:
            drop = torch.rand(len(idx), generator=gen) < cfg.cond_drop
            labels = torch.where(drop, torch.full_like(data.labels[idx], null), data.labels[idx]).to(device)
        loss = denoising_loss(unet, scheduler, x0, labels, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        step += 1
        run_loss += loss.item()
        bar.update(1)
        if step in snaps:
            save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()},
                      out / "snapshots" / f"step_{step:07d}.safetensors")
        if step % cfg.log_every == 0 or step == stop:
            dt = time.time() - t0
            wall += dt
            k = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            rec = dict(step=step, loss=run_loss / k, lr=sched.get_last_lr()[0], img_per_s=k * cfg.batch_size / dt,
                       wall_s=round(wall, 1))
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            run_loss, t0 = 0.0, time.time()
        if step % cfg.checkpoint_every == 0 or step == stop:
            save_state()
    bar.close()
    log.close()
    if step >= cfg.steps:
        return export_ema(out, cfg.export, device=str(device))
    return out


def export_ema(run_dir: str | os.PathLike, to: str | os.PathLike | None = None, device: str = "cpu",
               overwrite: bool = False) -> Path:
    """Write the EMA weights held in ``run_dir/state.pt`` as a model folder (default ``run_dir/model``).

    Works on an unfinished run too: ``train.json`` records the step reached and the wall time. An
    existing model folder there is only replaced (whole, with its card and posterior) with ``overwrite=True``."""
    run_dir = Path(run_dir)
    target = check_save_target(Path(to) if to else run_dir / "model", overwrite)
    state_path = run_dir / "state.pt"
    if not state_path.exists():
        raise FileNotFoundError(f"{state_path} not found: nothing to export")
    st = torch.load(state_path, map_location="cpu", weights_only=False)
    cfg = TrainConfig(**st["config"])
    unet = load_model(cfg.init)[0] if cfg.init else build_unet(cfg.dataset, cfg.conditional, **cfg.model_overrides)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    ema.load_state_dict(st["ema"])
    ema.copy_to(unet.parameters())
    return save_model(unet, build_scheduler(), target, overwrite=overwrite,
                      train={"config": st["config"], "steps": st["step"], "finished": st["step"] >= cfg.steps,
                             "wall_s": round(st["wall_s"], 1), "device": device,
                             "threads": torch.get_num_threads()})


def snapshot_files(run_dir: str | os.PathLike) -> list[Path]:
    """The K snapshot files of a run, oldest first."""
    return sorted((Path(run_dir) / "snapshots").glob("step_*.safetensors"))
