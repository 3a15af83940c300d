"""Sample metrics of docs/mathematics.md §4: class histogram, confident share, PUL, domain FID / KID.

Every number depends on the evaluator, the sample count and the reference set: the functions
return them alongside so results files can name them.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

CONFIDENT = 0.9  # max softmax probability above which a sample counts as confidently classified


class EvaluatorFeatures(nn.Module):
    """Penultimate evaluator features as a torchmetrics feature extractor (images in [-1, 1])."""

    def __init__(self, evaluator):
        super().__init__()
        self.evaluator = evaluator.eval()
        self.num_features = evaluator.num_features

    @torch.no_grad()
    def forward(self, x):
        return self.evaluator.features(x.to(next(self.evaluator.parameters()).device)).cpu()


def class_histogram(evaluator, images: torch.Tensor, threshold: float = CONFIDENT) -> dict:
    """Evaluator labels of ``images``: per-class counts and shares, confident share (docs/mathematics.md §4).

    ``images``: float (N, C, H, W) in [-1, 1]; other dtypes, NaN / inf and out-of-range values raise."""
    from .evaluator import Evaluator
    from .models import check_image_values

    if not isinstance(evaluator, Evaluator):  # an Evaluator's predict checks them itself (one pass, not two)
        check_image_values(images)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a softmax probability in [0, 1], got {threshold!r}")
    pred, conf = evaluator.predict(images)
    k = evaluator.config["num_classes"]
    counts = torch.bincount(pred, minlength=k)
    return {"n": len(images), "counts": counts.tolist(), "shares": (counts / len(images)).tolist(),
            "confident_share": (conf >= threshold).float().mean().item(), "threshold": threshold,
            "labels": pred, "confidence": conf}


def pul(labels_before: torch.Tensor, labels_after: torch.Tensor, forget_class: int) -> float:
    """Percentage of unlearning (docs/mathematics.md §1): ``(N_orig - N_unl) / N_orig * 100`` where N counts
    samples assigned to ``forget_class``, both sample sets drawn from the same seed bank."""
    n0 = int((torch.as_tensor(labels_before) == forget_class).sum())
    n1 = int((torch.as_tensor(labels_after) == forget_class).sum())
    if n0 == 0:
        raise ValueError(f"the original samples contain no class {forget_class}: PUL is undefined")
    return (n0 - n1) / n0 * 100.0


def _features(evaluator_or_dims):
    if isinstance(evaluator_or_dims, int):  # Inception path for users who have the weights
        return evaluator_or_dims
    return EvaluatorFeatures(evaluator_or_dims)


def _prep(x, feature):
    if isinstance(feature, int):  # Inception expects uint8 RGB
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return x


def _check_sets(fake, real, batch_size) -> None:
    from .models import check_image_values
    check_image_values(fake, "fake images")
    check_image_values(real, "real images")
    if len(fake) < 2 or len(real) < 2:
        raise ValueError(f"FID / KID need at least 2 images on each side, got {len(fake)} fake and {len(real)} real")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def domain_fid(evaluator, fake: torch.Tensor, real: torch.Tensor, batch_size: int = 500) -> float:
    """FID between ``fake`` and ``real`` images computed by torchmetrics on the evaluator's
    penultimate features (a *domain* FID, docs/mathematics.md §4). Pass ``evaluator=2048`` for Inception."""
    _check_sets(fake, real, batch_size)
    feat = _features(evaluator)
    m = FrechetInceptionDistance(feature=feat, reset_real_features=True)
    for imgs, is_real in ((real, True), (fake, False)):
        for i in range(0, len(imgs), batch_size):
            m.update(_prep(imgs[i:i + batch_size], feat), real=is_real)
    return float(m.compute())


def domain_kid(evaluator, fake: torch.Tensor, real: torch.Tensor, subsets: int = 50, subset_size: int = 500,
               batch_size: int = 500, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets, drawn with ``seed``) on the evaluator's
    features, via torchmetrics."""
    _check_sets(fake, real, batch_size)
    feat = _features(evaluator)
    size = min(subset_size, len(fake), len(real))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        m = KernelInceptionDistance(feature=feat, subsets=subsets, subset_size=size)
    for imgs, is_real in ((real, True), (fake, False)):
        for i in range(0, len(imgs), batch_size):
            m.update(_prep(imgs[i:i + batch_size], feat), real=is_real)
    with torch.random.fork_rng():  # torchmetrics draws the subsets from the global RNG
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)
