"""Diagonal Gaussian approximation of the pretrained posterior p(theta | D) from K checkpoints (docs/mathematics.md §1).

``mu*_i`` and ``sigma*_i^2`` are the per-parameter mean and (floored) variance over K weight sets.
Two documented ways to get the K sets, switchable in ``make_posterior``:

- ``"snapshots"`` (default, free): the K late raw-weight snapshots of one pretraining run, spaced
  ``snapshot_every`` steps apart (SWAG-diagonal). Their spread measures how far SGD wanders around
  the solution at the end of training.
- ``"continuations"``: K continuations of pretraining from the final weights with different seeds
  (independent data orders and minibatch noise), the paper's "independent checkpoints"; make them long
  enough to move (>= 1 epoch). Costs K x ``steps`` extra training steps.
- ``"self"``: the same continuations trained on ``self_samples`` samples of the model itself, for
  users who have one diffusers folder and neither checkpoints nor the training data.
- :func:`fisher_posterior` (no file): ``N(theta*, diag 1 / (N F + 1))`` with F the diagonal empirical
  Fisher of the forget set (the Laplace / EWC view: precision where the forget data is informative).

The file stores ``mu* - theta*`` and ``log sigma*^2`` (theta*: the EMA weights actually served, read
from the model folder), so VDU can use either centre for its regulariser, and a SHA-256 digest of theta*
(:func:`weights_digest`) so it is never paired with other weights. Four encodings (``codec``):

- ``"float16"`` (default): both fields in float16, two bytes per parameter and field.
- ``"int8"``: one byte per parameter and field, half the size (for a repository that holds many
  models). Per tensor, ``mu* - theta*`` is stored as int8 times a scale (``max |delta| / 127``) and
  ``log sigma*^2`` as uint8 on the tensor's own ``[min, max]`` range (``(max - min) / 255`` apart). The
  rounding error is at most half a step: for log-variances spanning 14 nats, 0.03 nats, i.e. a 3% error
  of a variance that K = 4-5 checkpoints estimate only to within about a factor of two. The mean's error
  is at most ``max |delta| / 254`` of its tensor; it is small against the parameter's own sigma* only where
  sigma* is not far below the tensor's largest offset (on the MNIST UNet: at most 0.09 sigma*, median
  0.004). The tensors have their own names (``delta_i8.``, ``logvar_u8.``, ``qparams.``), so a reader that
  knows only float16 files refuses an int8 one instead of misreading it.
- ``"int4"``: half a byte per parameter and field (a quarter of float16), for repositories that hold
  several models. ``log sigma*^2`` on 16 levels of its tensor's range (error at most 1/30 of the range:
  0.29 nats on the MNIST UNet, whose per-tensor ranges reach 8.6 nats); the mean as ``z = (mu* - theta*) /
  sigma*``, on 15 levels of ``[-max|z|, max|z|]``, so its error is a fraction of each parameter's own sigma*
  (MNIST UNet: median 0.18 sigma*, rms 0.24). Both errors are below what K checkpoints know: the
  log-variance of K = 4-5 Gaussian draws scatters by 0.8-1 nats, their mean by sigma* / sqrt(K) = 0.45-0.5
  sigma*. Names ``delta_i4.``, ``logvar_u4.`` (two values per byte) and ``qparams.``.
- ``"int4-var"``: only ``log sigma*^2``, as in int4 (half a byte per parameter). It
  serves VDU's default centre ``theta*`` (``center="deployed"``); ``center="mean"`` is refused, since the
  file holds no checkpoint mean.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

VAR_FLOOR = 1e-8
METHODS = ("snapshots", "continuations", "self")
CODECS = ("float16", "int8", "int4", "int4-var")
DIGEST_FORMAT = "sha256/float16/sorted-names/v1"
# Snapshots are accepted for a model only if their mean lies within this relative L2 distance of the
# model's weights (see make_posterior).
MAX_SNAPSHOT_DISTANCE = 0.25
# TrainConfig fields that the run of the snapshots and the run recorded in the model's train.json must share.
_RUN_IDENTITY = ("dataset", "conditional", "seed", "batch_size", "model_overrides", "init")


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
    """The old, weak checksum of a set of weights (sum of absolute values): blind to sign flips and
    permutations. Kept only to check posterior files written before :func:`weights_digest` existed."""
    return float(sum(v.detach().double().abs().sum() for v in params.values()))


def weights_digest(params: dict) -> str:
    """SHA-256 hex digest of a set of weights ``{name: tensor}``, as stored on disk.

    Parameters are hashed in sorted name order; for each, its name, its shape and the exact bytes of
    the tensor in float16 (the precision ``vdu.models.save_model`` stores weights in, so a model loaded
    from its folder in float32 gives the digest of the file) go in. Any change of a stored value, a sign
    flip, a permutation, a renamed or reshaped parameter changes the digest."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().to("cpu", torch.float16).contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# the stored tensors' names per codec: distinct, so a reader that knows only float16 files fails loudly on an
# int8 file ("no statistics for parameter ...") instead of reading its integers as values
KEYS = {"float16": ("delta.", "logvar."), "int8": ("delta_i8.", "logvar_u8."), "int4": ("delta_i4.", "logvar_u4."),
        "int4-var": (None, "logvar_u4.")}


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """Integers 0..15 -> two per byte (flattened, padded to an even count)."""
    q = q.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    return (q[0::2] | (q[1::2] << 4)).contiguous()


def _unpack4(b: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`_pack4`: the first ``n`` 4-bit integers, as float32."""
    return torch.stack([b & 15, b >> 4], 1).reshape(-1)[:n].float()


def _encode(name: str, delta: torch.Tensor, logvar: torch.Tensor, codec: str) -> dict:
    """The stored tensors of one parameter (see the module docstring for the four codecs)."""
    if not (torch.isfinite(delta).all() and torch.isfinite(logvar).all()):
        raise ValueError(f"the posterior statistics of {name!r} are not finite (NaN or inf in the mean or the "
                         f"variance): were the checkpoints finite?")
    kd, kv = KEYS[codec]
    if codec == "float16":
        return {kd + name: delta.half().contiguous(), kv + name: logvar.half().contiguous()}
    if codec.startswith("int4"):
        # log sigma*^2 on 16 levels of the tensor's [min, max]; the mean as z = delta / sigma (sigma decoded from
        # those levels) on 15 levels of [-max|z|, max|z|]: its error is a fraction of each parameter's own sigma
        lo, hi = (float(logvar.min()), float(logvar.max())) if logvar.numel() else (0.0, 0.0)
        step = (hi - lo) / 15 or 1.0
        qv = ((logvar - lo) / step).round().clamp(0, 15)
        out = {kv + name: _pack4(qv)}
        zscale = 1.0
        if kd:
            z = delta / (lo + qv * step).mul(0.5).exp()
            zscale = (float(z.abs().max()) / 7 if z.numel() else 0.0) or 1.0
            out[kd + name] = _pack4((z / zscale).round().clamp(-7, 7) + 8)
        return {**out, f"qparams.{name}": torch.tensor([zscale, lo, step], dtype=torch.float32)}
    empty = delta.numel() == 0
    scale = (0.0 if empty else float(delta.abs().max()) / 127) or 1.0
    lo, hi = (0.0, 0.0) if empty else (float(logvar.min()), float(logvar.max()))
    step = (hi - lo) / 255 or 1.0
    return {kd + name: (delta / scale).round().clamp(-127, 127).to(torch.int8).contiguous(),
            kv + name: ((logvar - lo) / step).round().clamp(0, 255).to(torch.uint8).contiguous(),
            f"qparams.{name}": torch.tensor([scale, lo, step], dtype=torch.float32)}


def _decode(flat: dict, name: str, codec: str, shape: tuple) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(mu* - theta*, log sigma*^2)`` of one parameter (of ``shape``) in float32, from the stored tensors (the
    first None for a variance-only file); ValueError when they are not what ``codec`` writes (a corrupt or
    mislabelled file)."""
    kd, kv = KEYS[codec]
    if codec.startswith("int4"):
        n, q = math.prod(shape), flat[f"qparams.{name}"]
        packed = [flat[kv + name]] + ([flat[kd + name]] if kd else [])
        if any(b.dtype != torch.uint8 or b.shape != ((n + 1) // 2,) for b in packed) or q.shape != (3,) \
                or not torch.isfinite(q).all():
            raise ValueError(f"{name!r}: int4 statistics expected ({(n + 1) // 2} packed bytes, 3 finite qparams), "
                             f"found {[(b.dtype, tuple(b.shape)) for b in packed]}, qparams {tuple(q.shape)}")
        zscale, lo, step = q.tolist()
        logvar = (lo + _unpack4(packed[0], n) * step).reshape(shape)
        delta = ((_unpack4(packed[1], n).reshape(shape) - 8) * zscale * logvar.mul(0.5).exp()) if kd else None
        return delta, logvar
    delta, logvar = flat[kd + name], flat[kv + name]
    if codec == "float16":
        if not (delta.is_floating_point() and logvar.is_floating_point()):
            raise ValueError(f"{name!r}: float16 statistics expected, found {delta.dtype} / {logvar.dtype}")
        return delta.float(), logvar.float()
    q = flat[f"qparams.{name}"]
    if delta.dtype != torch.int8 or logvar.dtype != torch.uint8 or q.shape != (3,) or not torch.isfinite(q).all():
        raise ValueError(f"{name!r}: int8 statistics expected (int8, uint8, 3 finite qparams), found "
                         f"{delta.dtype}, {logvar.dtype}, qparams {tuple(q.shape)}")
    scale, lo, step = q.tolist()
    return delta.float() * scale, lo + logvar.float() * step


def save_posterior(path: str | os.PathLike, mean: dict, var: dict, deployed: dict, k: int, method: str,
                   codec: str = "float16", provenance: str = "") -> Path:
    """Write the posterior compactly and atomically: ``delta.<name> = mu* - theta*`` and
    ``logvar.<name> = log sigma*^2`` in float16, in one byte each with ``codec="int8"``, in half a byte each
    with ``"int4"``, or the variance alone in half a byte with ``"int4-var"`` (``mean`` may then be None; module
    docstring); the deployed weights theta* live in the model folder itself; their SHA-256 digest
    (:func:`weights_digest`) is stored so a posterior cannot be paired with other weights."""
    import tempfile

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    if mean is None and KEYS[codec][0]:
        raise ValueError(f"this posterior stores no mean (a variance-only file), so it cannot be written in the "
                         f"{codec} codec, which stores one: use int4-var, or remake the posterior from checkpoints")
    path = Path(path)
    tensors = {}
    for n in var:
        tensors.update(_encode(n, torch.zeros(()) if mean is None else mean[n].float() - deployed[n].float(),
                               var[n].float().clamp_min(VAR_FLOOR).log(), codec))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"k": str(k), "method": method, "var_floor": str(VAR_FLOOR),
                                          "deployed_sha256": weights_digest(deployed),
                                          "digest_format": DIGEST_FORMAT, "codec": codec,
                                          **({"provenance": provenance} if provenance else {})})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def recode_posterior(path: str | os.PathLike, model: torch.nn.Module, codec: str = "int8") -> Path:
    """Rewrite the posterior file ``path`` of ``model`` in another ``codec`` (in place, atomically; the file
    is checked against the model first, and the rewritten file carries the SHA-256 digest of the model's
    weights). ``python -m vdu posterior MODEL_DIR --recode --codec int8 --overwrite``. float16 -> int8 is
    lossy (module docstring) and cannot be undone."""
    from safetensors import safe_open
    post = load_posterior(path, model)
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    how = (f"recoded from {meta.get('codec', 'float16')} (" + ("checked by SHA-256" if "deployed_sha256" in meta else
           "a file with only a sum-of-absolute-values checksum, which the model passed") + ")")
    return save_posterior(path, post["mean"], post["var"], post["deployed"], post["k"], post["method"], codec,
                          provenance="; ".join(filter(None, [meta.get("provenance", ""), how])))


def load_posterior(path: str | os.PathLike, model: torch.nn.Module) -> dict:
    """Read a posterior file for ``model`` (the *pretrained* weights theta* it was made from)
    -> ``{"mean", "var", "deployed": {name: tensor}, "k", "method"}``.

    Reads either codec (the file's ``codec`` metadata; float16 when absent). Raises a ValueError naming the
    first mismatch when the file was made for another architecture,
    or for other weights (SHA-256 digest of the float16 weights), and when the file is corrupt. Files
    written before the digest existed carry only a sum-of-absolute-values checksum: they still load,
    with a warning that this check cannot tell sign flips or permutations of the weights."""
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
    deployed = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}   # on the CPU, any model
    codec = meta.get("codec", "float16")
    if codec not in CODECS:
        raise ValueError(f"posterior {path} uses the codec {codec!r}, which this version cannot read (known: {CODECS})")
    kd = KEYS[codec][1] if codec.startswith("int4") else KEYS[codec][0]
    for name, p in deployed.items():
        if kd + name not in flat:
            raise ValueError(f"posterior {path} has no statistics for parameter {name!r}: "
                             f"it was made for a different architecture")
        if codec.startswith("int4") and flat[kd + name].numel() != (p.numel() + 1) // 2:
            raise ValueError(f"posterior {path}: parameter {name!r} has {flat[kd + name].numel()} packed bytes "
                             f"there but {p.numel()} values in the model ({(p.numel() + 1) // 2} bytes): a different "
                             f"architecture")
        if not codec.startswith("int4") and flat[kd + name].shape != p.shape:
            raise ValueError(f"posterior {path}: parameter {name!r} has shape {tuple(flat[kd + name].shape)} "
                             f"there but {tuple(p.shape)} in the model: a different architecture")
    if "deployed_sha256" in meta:
        want, have = meta["deployed_sha256"], weights_digest(deployed)
        if have != want:
            raise ValueError(f"posterior {path} was made for other weights (SHA-256 of its weights {want[:16]}..., "
                             f"of this model {have[:16]}...): load it with the pretrained model it was computed "
                             f"from, or remake it for this model with `python -m vdu posterior MODEL_DIR --overwrite`")
    elif "deployed_fingerprint" in meta:
        want, have = float(meta["deployed_fingerprint"]), fingerprint(deployed)
        if not abs(have - want) <= 1e-6 * abs(want):
            raise ValueError(f"posterior {path} was made for other weights (checksum {want:.6g}, model {have:.6g}): "
                             f"load it with the pretrained model it was computed from")
        warnings.warn(f"posterior {path} is in the old format: it only stores a sum-of-absolute-values checksum of "
                      f"its weights, which cannot tell a sign-flipped or permuted layer. Remake it with `python -m "
                      f"vdu posterior MODEL_DIR --overwrite` to store a SHA-256 digest", UserWarning, stacklevel=2)
    else:
        raise ValueError(f"posterior {path} records no digest of the weights it was made for, so it cannot be "
                         f"checked against this model: remake it with `python -m vdu posterior MODEL_DIR --overwrite`")
    try:
        stats = {n: _decode(flat, n, codec, tuple(p.shape)) for n, p in deployed.items()}
    except KeyError as e:
        raise ValueError(f"posterior {path} is corrupt: its {codec} statistics lack {e}") from e
    except ValueError as e:
        raise ValueError(f"posterior {path} is corrupt: {e}") from e
    out = {"mean": None if codec == "int4-var" else {n: deployed[n] + stats[n][0] for n in deployed},
           "var": {n: stats[n][1].exp() for n in deployed}, "deployed": deployed,
           "k": int(meta.get("k", 0)), "method": meta.get("method", "?")}
    return out


def check_snapshots_belong(deployed: dict, snapshots: list[dict], files: list, model_dir: Path, run_dir: Path,
                           max_distance: float = MAX_SNAPSHOT_DISTANCE) -> float:
    """Refuse (ValueError) snapshots that were not taken in the run that made the model; return the
    relative distance of their mean from the model's weights. See :func:`make_posterior`."""
    for f, sd in zip(files, snapshots):
        for n, p in deployed.items():
            if n not in sd or tuple(sd[n].shape) != tuple(p.shape):
                what = "has no parameter" if n not in sd else f"has shape {tuple(sd[n].shape)} for"
                raise ValueError(f"snapshot {f} {what} {n!r} (the model in {model_dir} has {tuple(p.shape)}): the "
                                 f"snapshots in {run_dir} are from a different architecture. Pass the run folder "
                                 f"that trained this model")
    train_json, run_cfg = Path(model_dir) / "train.json", Path(run_dir) / "config.json"
    if train_json.exists() and run_cfg.exists():
        made_by = json.loads(train_json.read_text()).get("config", {})
        run = json.loads(run_cfg.read_text())
        for key in _RUN_IDENTITY:
            if key in made_by and key in run and made_by[key] != run[key]:
                raise ValueError(f"the snapshots in {run_dir} come from another run than the model in {model_dir}: "
                                 f"the run has {key}={run[key]!r}, the model's train.json {key}={made_by[key]!r}. "
                                 f"Pass the run folder that trained this model")
    num = den = 0.0
    for n, p in deployed.items():
        mean = torch.stack([sd[n].float() for sd in snapshots]).mean(0)
        num += float((mean.double() - p.double()).pow(2).sum())
        den += float(p.double().pow(2).sum())
    dist = (num / max(den, 1e-30)) ** 0.5
    if not dist <= max_distance:
        raise ValueError(f"the snapshots in {run_dir} do not belong to the model in {model_dir}: their mean is "
                         f"{dist:.3g} of the weights' norm away from its weights (at most {max_distance} for "
                         f"snapshots of the run that made it). Pass the run folder that trained this model")
    return dist


def make_posterior(model_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None, k: int = 4,
                   method: str = "snapshots", continuation_steps: int = 200, continuation_lr: float = 1e-4,
                   out: str | os.PathLike | None = None, progress: bool = True,
                   work_dir: str | os.PathLike | None = None, overwrite: bool = False, self_samples: int = 1000,
                   self_seed: int = 777, codec: str = "float16") -> Path:
    """Build ``model_dir/posterior.safetensors`` (or ``out``) from K checkpoints (see module docstring),
    stored with ``codec`` (float16, or int8 at half the size).

    An existing posterior file is only replaced with ``overwrite=True`` (checked before any work).

    'snapshots' checks that the last K snapshots of ``run_dir`` belong to the model, cheaply (one pass
    over K state dicts, no forward passes):

    1. every parameter of the model is in each snapshot with the same shape (same architecture);
    2. when the model folder has ``train.json`` and the run folder ``config.json``, the two configs agree
       on the fields that identify a run (dataset, conditional, seed, batch size, model overrides,
       init): a model exported from that run records the run's config;
    3. the snapshots' mean lies within ``MAX_SNAPSHOT_DISTANCE`` (relative L2, ||mean - theta*|| /
       ||theta*||) of the model's weights theta*. The EMA weights of a run are an average of its late
       iterates, so they sit close to the late snapshots' mean (0.7% of the weights' norm for
       checkpoints/mnist/ddpm); two independently trained models are about as far apart as their
       own norm (0.98 between the committed MNIST ddpm and ddpm-cond), so the bound separates the
       two with a wide margin either side. This also catches a run
       folder whose config matches but whose weights differ (a rerun, or a model that was fine-tuned
       far after export). It cannot tell a model fine-tuned slightly from the exported one: the
       SHA-256 digest stored in the file pins the exact weights from then on.

    'continuations' trains in ``work_dir`` (default: a fresh temporary folder); finished continuations
    found there are reused, so a K sweep with one ``work_dir`` trains each seed once. A continuation
    is reused only if its recorded config is the one this call would run."""
    from .models import load_model
    from .training import TrainConfig, pretrain, snapshot_files

    model_dir = Path(model_dir)
    out_path = Path(out) if out is not None else model_dir / "posterior.safetensors"
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists; refusing to overwrite it. Pass overwrite=True "
                              f"(`python -m vdu posterior ... --overwrite`) to replace it, or write elsewhere with out=")
    if out_path.is_dir():
        raise IsADirectoryError(f"{out_path} is a folder; pass a file path for the posterior")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    if k < 2 or continuation_steps < 1:
        raise ValueError(f"need k >= 2 checkpoints and continuation_steps >= 1 (got {k}, {continuation_steps})")
    unet, _ = load_model(model_dir)
    deployed = {n: p.detach() for n, p in unet.named_parameters()}
    if method == "snapshots":
        if run_dir is None:
            raise ValueError("method='snapshots' needs the pretraining run folder (run_dir)")
        files = snapshot_files(run_dir)[-k:]
        if len(files) < k:
            raise ValueError(f"{run_dir} holds {len(files)} snapshots, fewer than K={k}")
        sds = [load_file(f) for f in files]
        check_snapshots_belong(deployed, sds, files, model_dir, Path(run_dir))
    else:
        from dataclasses import asdict
        import tempfile
        train_json = model_dir / "train.json"
        base = json.loads(train_json.read_text())["config"] if train_json.exists() else asdict(TrainConfig())
        data = None
        if method == "self":
            data = _self_data(unet, self_samples, seed=self_seed, progress=progress)
            base = {**base, "max_train": None}
        work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="vdu-continuations-"))
        sds = []
        for i in range(k):
            cfg = TrainConfig(**{**base, "init": str(model_dir), "seed": 1000 + i, "steps": continuation_steps,
                                 "warmup": 1, "lr": continuation_lr, "lr_final_frac": 1.0, "k_snapshots": 1,
                                 "snapshot_every": continuation_steps, "checkpoint_every": continuation_steps,
                                 "out": str(work / f"{'self' if method == 'self' else 'continuation'}{i}"),
                                 "export": str(work / f"{'self' if method == 'self' else 'continuation'}{i}/model")})
            done = Path(cfg.out) / "snapshots" / f"step_{continuation_steps:07d}.safetensors"
            cfg_file = Path(cfg.out) / "config.json"
            if not (done.exists() and cfg_file.exists() and json.loads(cfg_file.read_text()) == json.loads(json.dumps(asdict(cfg)))):
                # a finished continuation is reused as is; pretrain() would re-export its model folder
                pretrain(replace(cfg), data=data, progress=progress)
            sds.append(load_file(snapshot_files(cfg.out)[-1]))
    names = set(deployed)
    sds = [{n: v for n, v in sd.items() if n in names} for sd in sds]
    mean, var = gaussian_from_checkpoints(sds)
    return save_posterior(out_path, mean, var, deployed, k, method, codec)


def _self_data(unet, n: int, seed: int = 777, steps: int = 20, progress: bool = True):
    """``n`` samples of the model (DDIM ``steps``) as training data for the 'self' continuations; a
    class-conditional model is sampled with prompts ``i % classes`` and keeps them as labels."""
    from .data import ImageData
    from .diffusion import sample
    from .models import build_scheduler, null_class
    if n < 1:
        raise ValueError(f"self_samples must be >= 1, got {n}")
    null = null_class(unet)
    labels = torch.zeros(n, dtype=torch.long) if null is None else torch.arange(n) % null
    x = sample(unet, build_scheduler(), n, seed=seed, steps=steps,
               class_labels=None if null is None else labels, progress=progress)
    return ImageData(x, labels, [str(i) for i in range(int(labels.max()) + 1)], "self-samples")


def fisher_posterior(model: torch.nn.Module, scheduler, images: torch.Tensor, batch_size: int = 16,
                     n_batches: int | None = None, seed: int = 0, labels=None) -> dict:
    """A posterior from the model and the forget set alone: mean theta*, variance ``1 / (N F_i + 1)`` floored
    at ``VAR_FLOOR``, with ``F_i = E[(d L_simple / d theta_i)^2]`` the diagonal empirical Fisher over
    mini-batches of ``images`` (N of them). The Laplace approximation with the Fisher as the curvature:
    narrow where the forget data pins a weight, wide (up to 1) where it says nothing. Returns the dict
    ``unlearn(..., posterior=)`` takes (``center="mean"`` and ``"deployed"`` coincide here), with ``fisher``
    (the F_i) and ``n`` (N) beside it."""
    from .diffusion import denoising_loss
    if len(images) == 0 or batch_size < 1:
        raise ValueError("fisher_posterior needs forget images and batch_size >= 1")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    F = {n: torch.zeros_like(p) for n, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    nb = n_batches or max(1, len(images) // batch_size)
    dev = next(model.parameters()).device
    for _ in range(nb):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=g)
        lab = None if labels is None else torch.as_tensor(labels)[idx].to(dev)
        loss = denoising_loss(model, scheduler, images[idx].to(dev), lab, generator=g)
        for (n, p), gr in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if gr is not None:
                F[n] += gr.detach().pow(2) / nb
    deployed = {n: p.detach().clone() for n, p in params.items()}
    var = {n: (1.0 / (len(images) * F[n] + 1.0)).clamp_min(VAR_FLOOR) for n in params}
    return {"mean": deployed, "var": var, "deployed": deployed, "k": 0, "method": "fisher", "fisher": F,
            "n": len(images)}
