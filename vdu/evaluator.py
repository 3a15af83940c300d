"""The evaluator: a small CNN classifier per dataset that labels generated samples (PUL, class
histograms) and whose penultimate features give the domain FID/KID (docs/mathematics.md §4)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import check_dataset, load_dataset


def _block(i, o):
    return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


ARCHS = ("cnn", "lenet")


class Evaluator(nn.Module):
    """``arch="cnn"`` (the evaluator): conv32x2 - pool - conv64x2 - pool - conv128 - global average pool
    (features) - linear. ``arch="lenet"`` (the independent cross-check): 5x5 conv - pool - 5x5 conv - pool -
    fully connected ``4 * width`` (features) - linear; no batch norm, no global pooling, so it does not
    share the first one's inductive biases."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32,
                 arch: str = "cnn"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width,
                           arch=arch)
        w = width
        if arch == "cnn":
            self.body = nn.Sequential(*_block(in_channels, w), *_block(w, w), nn.MaxPool2d(2),
                                      *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),
                                      *_block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            side = ((image_size - 4) // 2 - 4) // 2
            self.body = nn.Sequential(nn.Conv2d(in_channels, w, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(w, 2 * w, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
                                      nn.Linear(2 * w * side * side, 4 * w), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, num_classes))
        self.num_features = 4 * w

    def check(self, x: torch.Tensor) -> None:
        c, s = self.config["in_channels"], self.config["image_size"]
        if x.ndim != 4 or x.shape[1] != c or tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"evaluator expects images of shape (N, {c}, {s}, {s}), got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, num_features) of images in [-1, 1]."""
        self.check(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted class, max softmax probability) per image of ``x`` (float, in [-1, 1]).

        Non-float, non-finite or out-of-range images raise (a NaN image would otherwise get a label)."""
        from .models import check_image_values

        if not torch.is_tensor(x):
            check_image_values(x)
        self.check(x)
        check_image_values(x)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        probs = torch.cat([F.softmax(self(x[i:i + batch_size].to(dev)), 1).cpu() for i in range(0, len(x), batch_size)])
        self.train(was)
        conf, pred = probs.max(1)
        return pred, conf


def save_evaluator(model: Evaluator, folder: str | os.PathLike, card: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(model.config, indent=2))
    if card is not None:
        (folder / "card.json").write_text(json.dumps(card, indent=2))
    return folder


def load_evaluator(folder: str | os.PathLike, device="cpu") -> Evaluator:
    """Load an evaluator folder (``config.json`` + ``model.safetensors``) with clear errors."""
    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder} is not an evaluator folder (needs config.json and model.safetensors); "
                                f"train one with `python -m vdu evaluator --out {folder}`")
    model = Evaluator(**json.loads((folder / "config.json").read_text()))
    try:
        model.load_state_dict(load_file(folder / "model.safetensors"))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ValueError(f"evaluator checkpoint in {folder} is corrupt or does not match its config: {e}") from e
    return model.to(device).eval()


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (zero/background padding)."""
    n = len(x)
    pad = F.pad(x, [max_shift] * 4, value=-1.0)
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)).tolist()
    h, w = x.shape[2:]
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def outliers(x: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Synthetic non-images for outlier exposure: uniform noise, near-constant images and 50/50
    blends of two images of different classes, one third each (the failure modes of a generator)."""
    n = len(x)
    kind = torch.arange(n) % 3
    noise = torch.rand(x.shape, generator=gen) * 2 - 1
    flat = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1 + 0.1 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    perm = torch.randperm(n, generator=gen)
    perm = torch.where(labels[perm] == labels, torch.roll(perm, 1), perm)
    blend = 0.5 * (x + x[perm])
    k = kind.view(-1, 1, 1, 1)
    return torch.where(k == 0, noise, torch.where(k == 1, flat, blend))


@torch.no_grad()
def accuracy(model: Evaluator, data) -> float:
    pred, _ = model.predict(data.images)
    return (pred == data.labels).float().mean().item()


def train_evaluator(dataset: str, out: str | os.PathLike | None = None, epochs: int = 3, batch_size: int = 128,
                    lr: float = 2e-3, seed: int = 0, data_root=None, max_train: int | None = None,
                    device=None, progress: bool = True, command: str = "", oe_weight: float = 0.5, init: str | None = None,
                    arch: str = "cnn") -> dict:
    """Train the evaluator of ``dataset`` (AdamW, one-cycle LR, shift augmentation, outlier exposure
    so that noise, blank and blended images get low confidence); returns its card. ``init``
    fine-tunes an existing evaluator folder instead of starting from scratch. The second, independent
    evaluator: ``arch="lenet"``, another seed and ``oe_weight=0`` (no outlier exposure)."""
    spec = check_dataset(dataset)
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if not oe_weight >= 0:
        raise ValueError(f"oe_weight must be >= 0, got {oe_weight!r}")
    if out is not None and (Path(out) / "model.safetensors").exists() and (init is None or Path(init) != Path(out)):
        raise FileExistsError(f"{out} already holds an evaluator; choose another --out (or fine-tune it with --init {out})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    train, test = load_dataset(dataset, "train", data_root), load_dataset(dataset, "test", data_root)
    if max_train:
        train = train.take(max_train, seed=seed)
    c, s, _ = spec["shape"]
    model = load_evaluator(init, device) if init else \
        Evaluator(c, len(train.classes), s, width=32 if dataset == "mnist" else 64, arch=arch).to(device)
    model.train()
    history = json.loads((Path(init) / "card.json").read_text()) if init and (Path(init) / "card.json").exists() else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    per_epoch = len(train) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * per_epoch)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    bar = tqdm(total=epochs * per_epoch, desc=f"evaluator {dataset}", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = _augment(train.images[idx], gen)
            if c == 3 and torch.rand((), generator=gen) < 0.5:
                x = x.flip(3)
            y = train.labels[idx]
            ood = outliers(x[: len(x) // 4], y[: len(x) // 4], gen) if oe_weight > 0 else x[:0]
            logits = model(torch.cat([x, ood]).to(device))
            # cross-entropy on real images + outlier exposure (uniform target on non-images)
            loss = F.cross_entropy(logits[: len(x)], y.to(device))
            if oe_weight > 0:
                loss = loss - oe_weight * F.log_softmax(logits[len(x):], 1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    from .results import machine
    card = {"command": command, "machine": machine(), "init": history, "dataset": dataset, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
            "arch": model.config["arch"], "train_images": len(train), "test_accuracy": round(accuracy(model, test), 5),
            "test_images": len(test), "outlier_exposure_weight": oe_weight,
            "confident_share_test": round((model.predict(test.images)[1] >= 0.9).float().mean().item(), 4),
            "confident_share_uniform_noise": round((model.predict(outliers(test.images[:300], test.labels[:300],
                                                   torch.Generator().manual_seed(1))[::3])[1] >= 0.9).float().mean().item(), 4),
            "wall_s": round(time.time() - t0, 1), "device": str(device),
            "threads": torch.get_num_threads(), "num_features": model.num_features}
    if out is not None:
        save_evaluator(model.cpu(), out, card)
    return card
