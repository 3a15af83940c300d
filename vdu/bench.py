"""``make bench``: throughput of the kernels everything else is built on, on this machine.

Writes ``results/<dataset>/bench.json``. Speed goals live here, not in timed tests.
"""
from __future__ import annotations

import argparse
import time

import torch

from .evaluator import Evaluator
from .likelihood import nll_bits_per_dim
from .models import build_scheduler, build_unet, default_device
from .results import write_results
from .sampling import sample
from .training import denoising_loss


def _time(fn, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def _stepper(unet, loss_fn):
    """One AdamW step on ``loss_fn()`` as a callable (the unit both step costs are measured in)."""
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)

    def step():
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def run(dataset: str = "mnist", batch: int = 64, repeats: int = 5) -> dict:
    """Images per second of a training step, DDIM sampling, the NLL bound and the evaluator."""
    dev = default_device()
    unet, sched = build_unet(dataset).to(dev), build_scheduler()
    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.randn(batch, c, s, s, device=dev)
    train_step = _stepper(unet, lambda: denoising_loss(unet, sched, x))
    out = {"unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 3), "batch": batch}
    out["train_img_per_s"] = round(batch / _time(train_step, repeats), 1)
    t = _time(lambda: sample(unet, sched, batch, steps=5, batch_size=batch, progress=False), max(1, repeats // 2), 1)
    out["ddim_img_steps_per_s"] = round(batch * 5 / t, 1)
    t = _time(lambda: nll_bits_per_dim(unet, sched, x.clamp(-1, 1), timesteps=5, progress=False), max(1, repeats // 2), 1)
    out["nll_img_terms_per_s"] = round(batch * 6 / t, 1)
    ev = Evaluator(c, 10, s).to(dev).eval()
    out["evaluator_img_per_s"] = round(batch / _time(lambda: ev.predict(x), repeats), 1)
    out.update(vdu_step_cost(unet, sched, x, repeats))
    return out


def vdu_step_cost(unet, sched, x, repeats: int = 5) -> dict:
    """Seconds of one VDU step (methods.md §1: L = gamma B + (1 - gamma) A, "mean" normalisation)
    relative to one plain denoising fine-tuning step on the same batch (issue goal: <= 1.1x); and of one
    step with ``stability="function"`` (the replay KL doubles the forward/backward work: expect ~2x)."""
    from .objectives import FunctionSpaceRegularizer, StabilityRegularizer, vdu_loss

    post = {"mean": {n: p.detach().clone() for n, p in unet.named_parameters()},
            "var": {n: torch.full_like(p, 1e-6) for n, p in unet.named_parameters()}}
    reg = StabilityRegularizer(unet, post, center="mean")
    plain = _stepper(unet, lambda: denoising_loss(unet, sched, x))
    vdu = _stepper(unet, lambda: vdu_loss(unet, sched, x, reg, 0.5)["loss"])
    fn_reg = FunctionSpaceRegularizer(unet, sched, n=len(x), ddim_steps=2)
    fn = _stepper(unet, lambda: vdu_loss(unet, sched, x, fn_reg, 0.8)["loss"])

    # interleave to share machine-load drift fairly between them
    tp, tv, tf = [], [], []
    for _ in range(3):
        tp.append(_time(plain, repeats, 1))
        tv.append(_time(vdu, repeats, 1))
        tf.append(_time(fn, repeats, 1))
    tp, tv, tf = min(tp), min(tv), min(tf)
    return {"finetune_step_s": round(tp, 4), "vdu_step_s": round(tv, 4), "vdu_step_ratio": round(tv / tp, 3),
            "vdu_function_step_s": round(tf, 4), "vdu_function_step_ratio": round(tf / tp, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m vdu.bench")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    res = run(a.dataset, a.batch)
    path = write_results(a.dataset, "bench", res, profile="full")
    for k, v in res.items():
        print(f"{k:>24}: {v}")
    print("wrote", path)


if __name__ == "__main__":
    main()
