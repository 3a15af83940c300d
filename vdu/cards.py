"""Model cards: evaluate a committed model and write ``card.json`` + ``samples.png`` beside it."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from .data import load_dataset
from .evaluation import EvalConfig, wilson_interval
from .evaluator import load_evaluator
from .diffusion import nll_bits_per_dim
from .metrics import class_histogram, domain_fid, domain_kid
from .models import load_model, null_class
from .results import machine


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 10) -> Path:
    """Save images in [-1, 1] as a PNG grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images[: nrow * nrow] + 1) / 2, path, nrow=nrow, padding=1, pad_value=1.0)
    return path


def grid_array(images: torch.Tensor, nrow: int | None = None):
    """Images in [-1, 1] (or uint8, :func:`vdu.data.to_uint8`) as one (H, W) or (H, W, 3) array in [0, 1] for
    ``plt.imshow``."""
    from torchvision.utils import make_grid

    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1
    nrow = nrow or int(len(images) ** 0.5)
    g = make_grid((images[: nrow * nrow] + 1) / 2, nrow=nrow, padding=1, pad_value=1.0).permute(1, 2, 0)
    return g[..., 0].numpy() if images.shape[1] == 1 else g.numpy()


def quality_bar(hist: dict, confident_min: float = 0.9, share_range=(0.05, 0.15), basis: str = "") -> dict:
    """The base models' quality bar: a confident share of at least ``confident_min`` (MNIST: 90%; see
    :func:`confident_min_for`) and every class within 5-15%."""
    lo, hi = share_range
    shares, conf = hist["shares"], hist["confident_share"]
    if "counts" in hist:   # from the counts in float64: float32 shares put 900 of 1,000 below 90%, 150 above 15%
        n = sum(hist["counts"])
        shares = [c / n for c in hist["counts"]]
        conf = (int((torch.as_tensor(hist["confidence"]) >= hist["threshold"]).sum()) if "confidence" in hist
                else round(conf * n)) / n
    ok_conf = conf >= confident_min
    ok_share = all(lo <= s <= hi for s in shares)
    return {"confident_share_ok": ok_conf, "class_shares_ok": ok_share, "met": ok_conf and ok_share,
            "confident_min": round(confident_min, 4),
            "rule": f"confident(max p >= {hist['threshold']}) >= {100 * confident_min:.3g}%{basis}, "
                    f"every class in [{lo:.0%}, {hi:.0%}]"}


def confident_min_for(dataset: str, evaluator_dir: str | os.PathLike | None) -> tuple[float, str]:
    """The confident share a base model must reach, and why: 90% on MNIST, where the evaluator is confident
    on 96% of real test digits; elsewhere half the share the evaluator gives real test images (its card's
    ``confident_share_test``), since a generated image cannot be asked to look more certain than a real one."""
    if dataset == "mnist":
        return 0.9, ""
    if evaluator_dir is None:
        raise ValueError(f"the {dataset} quality bar is half the evaluator's confident share on real test images: "
                         f"pass the evaluator folder whose card records it")
    card = Path(evaluator_dir) / "card.json"
    if not card.exists():
        raise FileNotFoundError(f"{card} is missing: the {dataset} quality bar is half the evaluator's confident "
                                f"share on real test images, recorded on its card (python -m vdu evaluator)")
    real = json.loads(card.read_text()).get("confident_share_test")
    if not isinstance(real, (int, float)) or not 0 < real <= 1:
        raise ValueError(f"{card} records no confident_share_test in (0, 1] (got {real!r}): retrain or re-measure "
                         f"the evaluator with `python -m vdu evaluator`")
    return real / 2, f" (half of the evaluator's {real:.1%} on real test images)"


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval (95% by default) of a share ``k / n``, its ends rounded outwards to 4 decimals."""
    import math
    if int(k) != k or int(n) != n or not 0 <= k <= n or n < 1:
        raise ValueError(f"need whole counts 0 <= k <= n with n >= 1, got k={k}, n={n}")
    lo, hi = wilson_interval(k / n, n, z)
    return [max(0.0, math.floor(lo * 1e4) / 1e4), min(1.0, math.ceil(hi * 1e4) / 1e4)]


# how a card names the sampler its numbers were measured with
SAMPLER_NAMES = {"ddim": "DDIM {steps} steps, eta 0", "ddpm": "DDPM ancestral, {steps} steps",
                 "dpm": "DPM-Solver++ {steps} steps"}


def evaluate(unet, scheduler, evaluator, reference, n: int = 1000, ddim_steps: int = 50, nll_images: int = 256,
             nll_timesteps: int = 100, seed: int = 0, progress: bool = True,
             sampler: str = "ddim", confident_min: tuple[float, str] = (0.9, "")) -> tuple[dict, torch.Tensor]:
    """Sample ``n`` images from the seed bank with ``sampler`` ("ddim", "ddpm" ancestral, "dpm"; ``ddim_steps``
    steps) and measure them (docs/mathematics.md §4): class shares,
    confident share, domain FID/KID against ``reference`` (an ImageData), and the NLL bound of
    ``nll_images`` reference images. Class-conditional models get labels ``i % classes``.
    ``confident_min``: the quality bar's confident share and the reason for it (:func:`confident_min_for`).
    Returns (metrics, samples)."""
    t0 = time.time()
    labels = None
    if null_class(unet) is not None:
        labels = torch.arange(n) % null_class(unet)
    x = EvalConfig(n, sampler, ddim_steps, seed).sample(unet, scheduler, class_labels=labels, progress=progress)
    sample_s = time.time() - t0
    hist = class_histogram(evaluator, x)
    m = {
        "samples": {"n": n, "sampler": SAMPLER_NAMES[sampler].format(steps=ddim_steps), "seed_bank": seed,
                    "conditional_labels": "i % classes" if labels is not None else None, "wall_s": round(sample_s, 1)},
        "class_shares": [round(v, 4) for v in hist["shares"]],
        "confident_share": round(hist["confident_share"], 4),
        "confident_share_ci95_wilson": wilson(round(hist["confident_share"] * n), n),
        "domain_fid": round(domain_fid(evaluator, x, reference.images), 3),
        "domain_kid": [round(v, 5) for v in domain_kid(evaluator, x, reference.images)],
        "fid_features": f"vdu evaluator penultimate ({evaluator.num_features}-d), torchmetrics FID/KID, "
                        f"reference: {len(reference)} {reference.name} images",
        "quality_bar": quality_bar(hist, confident_min[0], basis=confident_min[1]),
    }
    if labels is not None:
        m["label_accuracy"] = round((hist["labels"] == labels).float().mean().item(), 4)
    xs = reference.take(nll_images, seed=seed)
    null = None if labels is None else torch.full((len(xs),), null_class(unet))
    bpd = nll_bits_per_dim(unet, scheduler, xs.images, class_labels=null, timesteps=nll_timesteps, progress=progress)
    m["bits_per_dim"] = {"mean": round(bpd.mean().item(), 4), "sem": round((bpd.std() / len(bpd) ** 0.5).item(), 4),
                         "images": nll_images, "t_terms": f"stratified, {nll_timesteps}"}
    if labels is not None:
        x = x[torch.argsort(labels, stable=True)]
    return m, x


def model_card(model_dir: str | os.PathLike, evaluator_dir: str | os.PathLike, n: int = 1000, ddim_steps: int = 50,
               nll_images: int = 256, nll_timesteps: int = 100, seed: int = 0, command: str = "",
               data_root=None, progress: bool = True, notes: str = "", sampler: str = "ddim") -> dict:
    """Evaluate a model folder against its dataset's test set; write card.json and samples.png there.
    ``sampler``/``ddim_steps``: how the card's samples are drawn (see :func:`evaluate`)."""
    from .training import TrainConfig

    model_dir = Path(model_dir)
    unet, sched = load_model(model_dir)
    ev = load_evaluator(evaluator_dir)
    train = json.loads((model_dir / "train.json").read_text()) if (model_dir / "train.json").exists() else {}
    dataset = train.get("config", {}).get("dataset", "mnist")
    metrics, x = evaluate(unet, sched, ev, load_dataset(dataset, "test", data_root), n, ddim_steps, nll_images,
                          nll_timesteps, seed, progress, sampler, confident_min_for(dataset, evaluator_dir))
    cfg = train.get("config", {})
    if cfg.get("canaries"):          # a canary model: how much of its canaries it reproduces and explains
        from .canaries import canary_sets, has_mark
        trained, held = canary_sets(load_dataset(dataset, "train", data_root), cfg["canaries"])
        kw = dict(timesteps=nll_timesteps, seed=seed, progress=progress)
        a, b = (nll_bits_per_dim(unet, sched, s.images, **kw).double() for s in (trained, held))
        metrics["canaries"] = {
            "n": cfg["canaries"], "repeat": cfg.get("canary_repeat", 1),
            "mark_rate": round(has_mark(x).float().mean().item(), 4), "detector": "vdu.canaries.mark_score >= 1.0",
            "nll_trained": round(a.mean().item(), 4), "nll_held_out": round(b.mean().item(), 4),
            "membership_gap": round((a.mean() - b.mean()).item(), 4),
            "membership_gap_sem": round(((a.var() / len(a) + b.var() / len(b)) ** 0.5).item(), 4),
            "t_terms": f"stratified, {nll_timesteps}"}
    command_made = TrainConfig(**train["config"]).command() if "config" in train else ""
    if (model_dir / "averaged.json").exists():   # a weight average (python -m vdu average)
        made = json.loads((model_dir / "averaged.json").read_text())
        command_made = " ".join(["python -m vdu average", str(model_dir), *made["from"]])
    card = {"model": str(model_dir),
            "command": command_made,
            "card_command": command, "evaluator": str(evaluator_dir),
            "train_steps": train.get("steps"), "train_finished": train.get("finished", True),
            "train_wall_s": train.get("wall_s"), "train_device": train.get("device"),
            "train_config": train.get("config"), "card_machine": machine(),
            "card_written": time.strftime("%Y-%m-%d %H:%M:%S"), "notes": notes, "metrics": metrics}
    save_grid(x[:: max(1, len(x) // 100)][:100], model_dir / "samples.png")
    (model_dir / "card.json").write_text(json.dumps(card, indent=2))
    return card
