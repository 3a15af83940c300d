"""Diagonal Gaussian approximation of the pretrained posterior p(theta | D) from K checkpoints (methods.md §1).

``mu*_i`` and ``sigma*_i^2`` are the per-parameter mean and (floored) variance over K weight sets.
Two documented ways to get the K sets, switchable in ``make_posterior``:

- ``"snapshots"`` (default, free): the K late raw-weight snapshots of one pretraining run, spaced
  ``snapshot_every`` steps apart (SWAG-diagonal). Their spread measures how far SGD wanders around
  the solution at the end of training.
- ``"continuations"``: K short continuations of pretraining from the final weights with different
  seeds (independent minibatch noise), as in the measurement quoted in methods.md §1. Costs K x
  ``steps`` extra training steps.

The file stores ``mu* - theta*`` and ``log sigma*^2`` in float16 (theta*: the EMA weights actually
served, read from the model folder), so VDU can use either centre for its regulariser.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

VAR_FLOOR = 1e-8


def gaussian_from_checkpoints(state_dicts: list[dict], var_floor: float = VAR_FLOOR) -> tuple[dict, dict]:
    """Per-parameter mean and unbiased variance (floored at ``var_floor``) over K >= 2 state dicts."""
    if len(state_dicts) < 2:
        raise ValueError(f"need K >= 2 checkpoints for a variance, got {len(state_dicts)}")
    keys = list(state_dicts[0])
    for sd in state_dicts[1:]:
        if list(sd) != keys or any(sd[k].shape != state_dicts[0][k].shape for k in keys):
            raise ValueError("checkpoints do not share one architecture (parameter names or shapes differ)")
    mean, var = {}, {}
    for k in keys:
        stack = torch.stack([sd[k].float() for sd in state_dicts])
        mean[k] = stack.mean(0)
        var[k] = stack.var(0, unbiased=True).clamp_min(var_floor)
    return mean, var


def fingerprint(params: dict) -> float:
    """A float64 checksum of a set of weights (sum of absolute values)."""
    return float(sum(v.detach().double().abs().sum() for v in params.values()))


def save_posterior(path: str | os.PathLike, mean: dict, var: dict, deployed: dict, k: int, method: str) -> Path:
    """Write the posterior compactly and atomically: ``delta.<name> = mu* - theta*`` and
    ``logvar.<name> = log sigma*^2`` in float16 (the deployed weights theta* live in the model
    folder itself; a checksum of them is stored so a posterior cannot be paired with other weights)."""
    path = Path(path)
    tensors = {}
    for n in mean:
        tensors[f"delta.{n}"] = (mean[n].float() - deployed[n].float()).half().contiguous()
        tensors[f"logvar.{n}"] = var[n].float().clamp_min(VAR_FLOOR).log().half().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"k": str(k), "method": method, "var_floor": str(VAR_FLOOR),
                                      "deployed_fingerprint": repr(fingerprint(deployed))})
    os.replace(tmp, path)
    return path


def load_posterior(path: str | os.PathLike, model: torch.nn.Module) -> dict:
    """Read a posterior file for ``model`` (the *pretrained* weights theta* it was made from)
    -> ``{"mean", "var", "deployed": {name: tensor}, "k", "method"}``.

    Raises a ValueError naming the first mismatch when the file was made for another architecture,
    or for other weights (checksum), and when the file is corrupt."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"posterior file {path} not found (make it with `python -m vdu posterior`)")
    try:
        flat = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"posterior file {path} is corrupt: {e}") from e
    deployed = {n: p.detach().clone().float() for n, p in model.named_parameters()}
    for name, p in deployed.items():
        if f"delta.{name}" not in flat:
            raise ValueError(f"posterior {path} has no statistics for parameter {name!r}: "
                             f"it was made for a different architecture")
        if flat[f"delta.{name}"].shape != p.shape:
            raise ValueError(f"posterior {path}: parameter {name!r} has shape {tuple(flat[f'delta.{name}'].shape)} "
                             f"there but {tuple(p.shape)} in the model: a different architecture")
    want = float(meta.get("deployed_fingerprint", "nan"))
    have = fingerprint(deployed)
    if not abs(have - want) <= 1e-6 * abs(want):
        raise ValueError(f"posterior {path} was made for other weights (checksum {want:.6g}, model {have:.6g}): "
                         f"load it with the pretrained model it was computed from")
    out = {"mean": {n: deployed[n] + flat[f"delta.{n}"].float() for n in deployed},
           "var": {n: flat[f"logvar.{n}"].float().exp() for n in deployed}, "deployed": deployed,
           "k": int(meta.get("k", 0)), "method": meta.get("method", "?")}
    return out


def make_posterior(model_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None, k: int = 4,
                   method: str = "snapshots", continuation_steps: int = 200, continuation_lr: float = 1e-4,
                   out: str | os.PathLike | None = None, progress: bool = True,
                   work_dir: str | os.PathLike | None = None) -> Path:
    """Build ``model_dir/posterior.safetensors`` (or ``out``) from K checkpoints (see module docstring).

    'continuations' trains in ``work_dir`` (default: a fresh temporary folder); finished continuations
    found there are reused, so a K sweep with one ``work_dir`` trains each seed once."""
    from .models import load_model
    from .training import TrainConfig, pretrain, snapshot_files

    model_dir = Path(model_dir)
    unet, _ = load_model(model_dir)
    deployed = {n: p.detach() for n, p in unet.named_parameters()}
    if method == "snapshots":
        if run_dir is None:
            raise ValueError("method='snapshots' needs the pretraining run folder (run_dir)")
        files = snapshot_files(run_dir)[-k:]
        if len(files) < k:
            raise ValueError(f"{run_dir} holds {len(files)} snapshots, fewer than K={k}")
        sds = [load_file(f) for f in files]
    elif method == "continuations":
        import json
        import tempfile
        base = json.loads((model_dir / "train.json").read_text())["config"]
        work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="vdu-continuations-"))
        sds = []
        for i in range(k):
            cfg = TrainConfig(**{**base, "init": str(model_dir), "seed": 1000 + i, "steps": continuation_steps,
                                 "warmup": 1, "lr": continuation_lr, "lr_final_frac": 1.0, "k_snapshots": 1,
                                 "snapshot_every": continuation_steps, "checkpoint_every": continuation_steps,
                                 "out": str(work / f"continuation{i}"),
                                 "export": str(work / f"continuation{i}/model")})
            pretrain(replace(cfg), progress=progress)
            sds.append(load_file(snapshot_files(cfg.out)[-1]))
    else:
        raise ValueError(f"method must be 'snapshots' or 'continuations', got {method!r}")
    names = set(deployed)
    sds = [{n: v for n, v in sd.items() if n in names} for sd in sds]
    mean, var = gaussian_from_checkpoints(sds)
    return save_posterior(out or model_dir / "posterior.safetensors", mean, var, deployed, k, method)
