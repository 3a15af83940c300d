"""``make bench``: throughput of the kernels everything else is built on, on this machine.

Writes ``results/<dataset>/bench.json``. Speed goals live here, not in timed tests.
"""
from __future__ import annotations

import argparse
import time

import torch

from .diffusion import denoising_loss, nll_bits_per_dim, sample
from .evaluator import Evaluator
from .models import build_scheduler, build_unet, default_device
from .results import write_results


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
    xe = x.clamp(-1, 1)
    out["evaluator_img_per_s"] = round(batch / _time(lambda: ev.predict(xe), repeats), 1)
    out.update(vdu_step_cost(unet, sched, x, repeats))
    return out


def vdu_step_cost(unet, sched, x, repeats: int = 5) -> dict:
    """Seconds of one VDU step (docs/mathematics.md §1: L = gamma B + (1 - gamma) A, "mean" normalisation)
    relative to one plain denoising fine-tuning step on the same batch (goal: <= 1.1x); and of one
    step with ``stability="function"`` (the replay KL doubles the forward/backward work: expect ~2x)."""
    from .methods.vdu import FunctionSpaceRegularizer, StabilityRegularizer, vdu_loss

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


def sampler_quality(model_dir: str = "checkpoints/mnist/ddpm", evaluator_dir: str = "checkpoints/mnist/evaluator",
                    n: int = 256, seed: int = 0, n_reference: int = 2000) -> dict:
    """Evaluation sampling is what every table pays for: seconds and quality (confident share, domain FID vs
    ``n_reference`` test images) of ``n`` seed-bank samples of the committed model for DDIM 20 / 50 and
    DPM-Solver++ 10 / 20, and of DDIM 20 under bfloat16 autocast and with channels-last weights; each time
    as a ratio to DDIM 20 in float32."""
    from .data import load_dataset
    from .evaluator import load_evaluator
    from .metrics import class_histogram, domain_fid
    from .models import load_model
    from .results import REPO

    unet, sched = load_model(REPO / model_dir)
    ev = load_evaluator(REPO / evaluator_dir)
    ref = load_dataset("mnist", "test").take(n_reference, seed=seed).images
    rows = {}

    def measure(name, fn):
        t0 = time.perf_counter()
        x = fn()
        secs = time.perf_counter() - t0
        h = class_histogram(ev, x)
        rows[name] = {"s": round(secs, 2), "confident_share": round(h["confident_share"], 4),
                      "domain_fid": round(domain_fid(ev, x, ref), 3)}
        return x

    base = measure("ddim20", lambda: sample(unet, sched, n, seed=seed, steps=20, progress=False))
    measure("ddim50", lambda: sample(unet, sched, n, seed=seed, steps=50, progress=False))
    measure("dpm10", lambda: sample(unet, sched, n, seed=seed, method="dpm", steps=10, progress=False))
    measure("dpm20", lambda: sample(unet, sched, n, seed=seed, method="dpm", steps=20, progress=False))

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sample(unet, sched, n, seed=seed, steps=20, progress=False).float()
    xb = measure("ddim20_bf16", bf16)
    cl = __import__("copy").deepcopy(unet).to(memory_format=torch.channels_last)
    measure("ddim20_channels_last", lambda: sample(cl, sched, n, seed=seed, steps=20, progress=False))
    ref_s = rows["ddim20"]["s"]
    for r in rows.values():
        r["time_ratio"] = round(r["s"] / ref_s, 3)
    rows["bf16_max_abs_diff_vs_fp32"] = round((xb - base).abs().max().item(), 4)
    return {"samples": n, "model": model_dir, "reference": f"{n_reference} MNIST test images", "settings": rows}


def process_scaling(steps: int = 20, batch: int = 64, dataset: str = "mnist") -> dict:
    """Pretraining throughput with one process (all cores as threads) against two processes (half the threads
    each) through ``accelerate launch``, same global batch: the ratio says what DDP buys on this machine."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path
    cores = os.cpu_count() or 1
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            run = Path(tmp) / f"p{procs}"
            args = ["-m", "vdu", "pretrain", "--dataset", dataset, "--steps", str(steps), "--batch-size", str(batch),
                    "--max-train", str(batch * 4), "--warmup", "1", "--log-every", str(steps // 2),
                    "--checkpoint-every", str(steps), "--k-snapshots", "2", "--snapshot-every", "1",
                    "--out", str(run)]
            launch = [sys.executable] + args if procs == 1 else \
                [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] + args
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))}
            subprocess.run(launch, check=True, capture_output=True, env=env)
            logs = [json.loads(line) for line in open(run / "log.jsonl") if '"loss"' in line]
            out[f"{procs}_process_img_per_s"] = round(logs[-1]["img_per_s"], 1)   # the second half (warm)
    out["two_over_one"] = round(out["2_process_img_per_s"] / out["1_process_img_per_s"], 2)
    out["threads"] = f"{cores} per run in all (1 process x {cores}, 2 processes x {max(1, cores // 2)})"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m vdu.bench")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quality-samples", type=int, default=256,
                    help="samples per sampler setting in the speed-vs-quality comparison (0: skip it)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the 1- vs 2-process pretraining comparison")
    a = ap.parse_args()
    res = run(a.dataset, a.batch)
    if not a.no_scaling and not torch.cuda.is_available():
        res["process_scaling"] = process_scaling(batch=a.batch, dataset=a.dataset)
    if a.quality_samples and a.dataset == "mnist":
        res["sampling"] = sampler_quality(n=a.quality_samples)
    path = write_results(a.dataset, "bench", res, profile="full")
    for k, v in res.items():
        print(f"{k:>24}: {v}")
    print("wrote", path)


if __name__ == "__main__":
    main()
