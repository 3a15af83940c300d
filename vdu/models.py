"""Diffusers ``UNet2DModel`` + ``DDPMScheduler`` presets, loading and saving (docs/mathematics.md §0).

A model folder is a diffusers pipeline folder: ``unet/`` (config + safetensors) and ``scheduler/``,
so ``DDPMPipeline.from_pretrained(folder)`` opens ours and ``load_model`` opens hub pipelines such
as ``google/ddpm-cifar10-32`` once they are in the local cache or a local folder.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging

diffusers_logging.set_verbosity_error()  # no "install accelerate" notices on every load

from .data import check_dataset

# Architecture per dataset. Class-conditional models add ``num_class_embeds = classes + 1``: the
# last id is the null class used for classifier-free guidance.
PRESETS = {
    "mnist": dict(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                  block_out_channels=(32, 64, 128), norm_num_groups=8,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "cifar10": dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(64, 128, 128, 256), norm_num_groups=32,
                    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
}
PRESETS["tinyimagenet"] = PRESETS["cifar10"]
IMAGE_TOL = 1e-3  # how far outside [-1, 1] an image value may be (float rounding of a conversion)
NUM_CLASSES = {"mnist": 10, "cifar10": 10, "tinyimagenet": 10}


def build_unet(dataset: str, conditional: bool = False, **overrides) -> UNet2DModel:
    """A fresh UNet for ``dataset``; ``conditional`` adds a class embedding with a null class."""
    check_dataset(dataset)
    cfg = dict(PRESETS[dataset], **overrides)
    if conditional:
        cfg.setdefault("num_class_embeds", NUM_CLASSES[dataset] + 1)
    return UNet2DModel(**cfg)


def build_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> DDPMScheduler:
    """DDPM noise schedule (Ho et al. linear betas 1e-4..0.02 by default), epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type="epsilon", variance_type="fixed_small", clip_sample=True)


def null_class(unet: UNet2DModel) -> int | None:
    """The null (unconditional) class id of a class-conditional UNet, ``None`` if unconditional."""
    n = unet.config.num_class_embeds
    return None if n is None else n - 1


IMAGE_CONVERSIONS = ("from [0, 1]: x * 2 - 1; from [0, 255]: x / 127.5 - 1; "
                     "uint8 (N, H, W[, C]) arrays: vdu.data.to_tensor(x)")


def check_image_values(images, what: str = "images") -> None:
    """Raise if ``images`` are not a non-empty float tensor with finite values in [-1, 1] (tolerance 1e-3).

    One min/max pass over the data; the message says which conversion to use."""
    if not torch.is_tensor(images):
        raise TypeError(f"{what} must be a torch tensor of shape (N, C, H, W) in [-1, 1], got "
                        f"{type(images).__name__} (numpy uint8 images: vdu.data.to_tensor(x))")
    if not images.is_floating_point():
        raise ValueError(f"{what} have dtype {images.dtype}: the models take float images in [-1, 1] "
                         f"({IMAGE_CONVERSIONS})")
    if images.numel() == 0:
        raise ValueError(f"{what} are empty (shape {tuple(images.shape)}): pass at least one image")
    lo, hi = (v.item() for v in torch.aminmax(images.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what} contain NaN or inf values: pass finite images in [-1, 1] (find the bad ones with "
                         f"(~torch.isfinite(x)).flatten(1).any(1))")
    if lo < -1 - IMAGE_TOL or hi > 1 + IMAGE_TOL:
        raise ValueError(f"{what} have values in [{lo:.4g}, {hi:.4g}], outside [-1, 1] where the models work: "
                         f"convert them ({IMAGE_CONVERSIONS})")


def check_images(unet: UNet2DModel, images: torch.Tensor) -> None:
    """Raise a clear error if ``images`` do not match the model's channels and size, or are not float
    images in [-1, 1] (non-float dtypes, NaN / inf and out-of-range values are refused, see
    :func:`check_image_values`)."""
    if not torch.is_tensor(images):
        check_image_values(images)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    c, size = unet.config.in_channels, unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if images.shape[1] != c or tuple(images.shape[2:]) != size:
        raise ValueError(f"images of shape {tuple(images.shape[1:])} do not match the model, which expects "
                         f"({c}, {size[0]}, {size[1]})")
    if getattr(unet, "latent_space", False):      # VAE latents (vdu.text2image): finite, any range
        if not images.is_floating_point() or not torch.isfinite(images).all():
            raise ValueError("latents must be finite float tensors")
        return
    check_image_values(images)


def load_model(path_or_id: str | os.PathLike, device: str | torch.device = "cpu",
               local_files_only: bool = True) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load (unet, scheduler) from a local pipeline/model folder or a hub id via ``from_pretrained``.

    ``local_files_only=True`` (the default here: no network) reads only local folders and the
    Hugging Face cache; a missing model raises FileNotFoundError saying what to download where.
    """
    src = str(path_or_id)
    local = Path(src)
    if local.exists():
        sub = "unet" if (local / "unet").is_dir() else None
        if not (local / (sub or "") / "config.json").exists():
            raise FileNotFoundError(f"{local} holds no diffusers UNet (expected unet/config.json or config.json)")
    else:
        aside = sorted(local.parent.glob(f"{local.name}.old-*")) if local.parent.exists() else []
        if aside:
            raise FileNotFoundError(f"model folder {src!r} does not exist, but an interrupted overwrite left the "
                                    f"previous model at {aside[-1]}: rename it back to {local.name}")
        if src.startswith((".", "/", "~")) or src.count("/") != 1:
            raise FileNotFoundError(f"model folder {src!r} does not exist")
        sub = "unet"
    try:
        try:
            unet = UNet2DModel.from_pretrained(src, subfolder=sub, local_files_only=local_files_only,
                                               torch_dtype=torch.float32)
        except (OSError, EnvironmentError):
            if local.exists():
                raise
            unet = UNet2DModel.from_pretrained(src, local_files_only=local_files_only, torch_dtype=torch.float32)
            sub = None
    except (OSError, EnvironmentError) as e:
        if local.exists():
            raise ValueError(f"checkpoint at {local} is corrupt or incomplete: {e}") from e
        raise FileNotFoundError(
            f"model {src!r} is neither a local folder nor in the Hugging Face cache. On a machine with "
            f"network run `huggingface-cli download {src}` (or DDPMPipeline.from_pretrained({src!r})"
            f".save_pretrained(folder)) and pass that folder here.") from e
    except Exception as e:  # safetensors / json errors of a damaged file
        raise ValueError(f"checkpoint at {src} is corrupt or incomplete: {e}") from e
    sched_sub = "scheduler" if sub == "unet" else None
    try:
        scheduler = DDPMScheduler.from_pretrained(src, subfolder=sched_sub, local_files_only=local_files_only)
    except (OSError, EnvironmentError):
        scheduler = build_scheduler()
    return unet.to(device).eval(), scheduler


_UMASK = os.umask(0o022)  # read the process umask once (os.umask can only be read by setting it)
os.umask(_UMASK)


class ModelExistsError(FileExistsError):
    """The save target already holds a model and ``overwrite`` was not given."""


# Files or folders whose presence marks a folder as a saved model (pipeline folder or bare UNet folder).
_MODEL_MARKERS = ("model_index.json", "unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def holds_model(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a directory holding a saved model (pipeline or bare UNet folder)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / m).exists() for m in _MODEL_MARKERS)


def check_save_target(folder, overwrite: bool = False) -> Path:
    """Check, before any expensive work, that a model can be saved to ``folder``; return it as a Path.

    Raises ``NotADirectoryError`` when ``folder`` (or a parent) is an existing file, ``PermissionError``
    when the folder that would receive it is not writable, ``ModelExistsError`` (a FileExistsError) when
    ``folder`` already holds a model and ``overwrite`` is False, and ``FileExistsError`` when it is a
    non-empty folder that is not a model (saving replaces the whole folder, so that is never done).
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot save a model to {folder}: it is an existing file, not a folder; "
                                 f"pass a new folder path (or a model folder with overwrite=True)")
    if folder.is_dir():
        if holds_model(folder):
            if not overwrite:
                raise ModelExistsError(
                    f"{folder} already holds a model; refusing to overwrite it. Pass overwrite=True to replace "
                    f"it (the whole folder is replaced: its card, samples, posterior and other files go too), "
                    f"or save to another folder")
        elif any(folder.iterdir()):
            raise FileExistsError(f"cannot save a model to {folder}: it is a non-empty folder that holds no model, "
                                  f"and saving replaces the whole folder; pass a new or empty folder")
    anc = folder.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise NotADirectoryError(f"cannot save a model to {folder}: {anc} is a file, not a folder; "
                                 f"pass a path inside a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot save a model to {folder}: {anc} is not writable; pass a folder you can "
                              f"write to or fix its permissions")
    return folder


def _free_sibling(folder: Path, tag: str) -> Path:
    """A sibling path of ``folder`` named ``<name>.<tag>-<pid>[-n]`` that does not exist yet."""
    base = folder.with_name(f"{folder.name}.{tag}-{os.getpid()}")
    cand, n = base, 0
    while cand.exists() or cand.is_symlink():
        n += 1
        cand = base.with_name(f"{base.name}-{n}")
    return cand


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def save_model(unet: UNet2DModel, scheduler: DDPMScheduler, folder: str | os.PathLike,
               dtype: torch.dtype | None = torch.float16, overwrite: bool = False, **extra_json) -> Path:
    """Atomically save a pipeline folder (``unet/``, ``scheduler/``, ``model_index.json``).

    Weights are stored as ``dtype`` (float16 by default: half the size; ``load_model`` computes in
    float32). Extra keyword arguments are written as JSON files (``card={...}`` -> ``card.json``).

    ``folder`` must be new, empty, or (with ``overwrite=True``) an existing model folder; see
    :func:`check_save_target`, which runs first. The model is written completely into a fresh sibling
    temporary folder, then swapped in with one atomic exchange of the two folders where the system
    offers it (Linux ``renameat2``), else the old folder is renamed aside, the new one renamed into
    place, and only then is the old one deleted. Overwriting replaces the *whole* folder, so files that
    described the old weights (card.json, samples.png, posterior.safetensors, ...) do not survive beside
    the new ones. A save that fails leaves an existing folder untouched and removes only its own
    temporary folder.
    """
    import copy

    def write(tmp: Path):
        (copy.deepcopy(unet).to(dtype) if dtype is not None else unet).save_pretrained(
            tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": unet.config.get("_diffusers_version", ""),
                 "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        for name, obj in extra_json.items():
            (tmp / f"{name}.json").write_text(json.dumps(obj, indent=2))

    return atomic_folder(folder, overwrite, write)


def atomic_folder(folder: str | os.PathLike, overwrite: bool, write) -> Path:
    """Create or replace the model folder ``folder`` atomically: ``write(tmp)`` fills a fresh sibling
    temporary folder, which is then swapped in (see :func:`save_model`). ``folder`` must be new, empty, or
    (``overwrite=True``) an existing model folder (:func:`check_save_target`, checked first and again
    before the swap)."""
    import tempfile

    folder = check_save_target(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700; give it a normal folder's mode
        if not folder.exists():
            os.replace(tmp, folder)
            return folder
        check_save_target(folder, overwrite)  # the folder may have changed while we were writing
        if _exchange(tmp, folder):            # one atomic swap: the path always holds a complete model
            shutil.rmtree(tmp, ignore_errors=True)
            return folder
        old = _free_sibling(folder, "old")
        os.replace(folder, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, folder)
    except BaseException as e:
        try:
            os.replace(old, folder)
        except OSError as e2:
            raise OSError(f"saving to {folder} failed ({e}) and the previous model could not be moved back "
                          f"({e2}): it is intact in {old}, the new one in {tmp}; rename one of them to "
                          f"{folder.name}") from e
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
