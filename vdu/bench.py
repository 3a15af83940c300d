"""``make bench``: throughput of the kernels everything else is built on, on this machine.

Writes ``results/<dataset>/bench.json``. Speed goals live here, not in timed tests.

``python -m vdu.bench --device cuda`` (``make bench-gpu``) is the short prepared run for a GPU: the same
kernels in float32 and bfloat16 autocast at two batch sizes, one VDU step, the samplers' speed and quality,
each throughput also as a ratio to this CPU's ``bench.json``; it writes ``results/<dataset>/bench-gpu.json``
with the card of the machine (device, memory, CUDA and torch versions). A few minutes on one GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from .diffusion import denoising_loss, nll_bits_per_dim, sample
from .evaluator import Evaluator
from .models import build_scheduler, build_unet, default_device
from .results import REPO, write_results

THROUGHPUTS = ("train_img_per_s", "ddim_img_steps_per_s", "nll_img_terms_per_s", "evaluator_img_per_s")


def _time(fn, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def _autocast(device: torch.device, bf16: bool):
    """A fresh bfloat16 autocast context on ``device`` (or a no-op) per call."""
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def _stepper(unet, loss_fn, amp=contextlib.nullcontext):
    """One AdamW step on ``loss_fn()`` as a callable (the unit both step costs are measured in); the forward
    pass under ``amp()``, the backward pass outside it."""
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)

    def step():
        with amp():
            loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def run(dataset: str = "mnist", batch: int = 64, repeats: int = 5, device=None, bf16: bool = False) -> dict:
    """Images per second of a training step, DDIM sampling, the NLL bound and the evaluator on ``device``
    (default: CUDA when present), in float32 or under bfloat16 autocast."""
    dev = torch.device(device) if device is not None else default_device()
    amp = _autocast(dev, bf16)
    unet, sched = build_unet(dataset).to(dev), build_scheduler()
    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.randn(batch, c, s, s, device=dev)

    def under_amp(fn):
        def g():
            with amp():
                return fn()
        return g
    train_step = _stepper(unet, lambda: denoising_loss(unet, sched, x), amp)
    out = {"unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 3), "batch": batch,
           "precision": "bfloat16 autocast" if bf16 else "float32"}
    out["train_img_per_s"] = round(batch / _time(train_step, repeats), 1)
    t = _time(under_amp(lambda: sample(unet, sched, batch, steps=5, batch_size=batch, progress=False, device=dev)),
              max(1, repeats // 2), 1)
    out["ddim_img_steps_per_s"] = round(batch * 5 / t, 1)
    t = _time(under_amp(lambda: nll_bits_per_dim(unet, sched, x.clamp(-1, 1), timesteps=5, progress=False)),
              max(1, repeats // 2), 1)
    out["nll_img_terms_per_s"] = round(batch * 6 / t, 1)
    ev = Evaluator(c, 10, s).to(dev).eval()
    xe = x.clamp(-1, 1)
    out["evaluator_img_per_s"] = round(batch / _time(under_amp(lambda: ev.predict(xe)), repeats), 1)
    out.update(vdu_step_cost(unet, sched, x, repeats, amp))
    return out


def vdu_step_cost(unet, sched, x, repeats: int = 5, amp=contextlib.nullcontext) -> dict:
    """Seconds of one VDU step (docs/mathematics.md §1: L = gamma B + (1 - gamma) A, "mean" normalisation)
    relative to one plain denoising fine-tuning step on the same batch (goal: <= 1.1x); and of one
    step with ``stability="function"`` (the replay KL doubles the forward/backward work: expect ~2x)."""
    from .methods.vdu import FunctionSpaceRegularizer, StabilityRegularizer, vdu_loss

    post = {"mean": {n: p.detach().clone() for n, p in unet.named_parameters()},
            "var": {n: torch.full_like(p, 1e-6) for n, p in unet.named_parameters()}}
    reg = StabilityRegularizer(unet, post, center="mean")
    plain = _stepper(unet, lambda: denoising_loss(unet, sched, x), amp)
    vdu = _stepper(unet, lambda: vdu_loss(unet, sched, x, reg, 0.5)["loss"], amp)
    fn_reg = FunctionSpaceRegularizer(unet, sched, n=len(x), ddim_steps=2)
    fn = _stepper(unet, lambda: vdu_loss(unet, sched, x, fn_reg, 0.8)["loss"], amp)

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
                    n: int = 256, seed: int = 0, n_reference: int = 2000, device="cpu") -> dict:
    """Evaluation sampling is what every table pays for: seconds and quality (confident share, domain FID vs
    ``n_reference`` test images) of ``n`` seed-bank samples of the committed model for DDIM 20 / 50 and
    DPM-Solver++ 10 / 20, and of DDIM 20 under bfloat16 autocast and with channels-last weights; each time
    as a ratio to DDIM 20 in float32. The model samples on ``device``; the evaluator scores on the CPU."""
    from .data import load_dataset
    from .evaluator import load_evaluator
    from .metrics import class_histogram, domain_fid
    from .models import load_model
    from .results import REPO

    dev = torch.device(device)
    unet, sched = load_model(REPO / model_dir, device=dev)
    ev = load_evaluator(REPO / evaluator_dir)
    ref = load_dataset("mnist", "test").take(n_reference, seed=seed).images
    rows = {}

    def measure(name, fn):
        t0 = time.perf_counter()
        x = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        x = x.float().cpu()
        h = class_histogram(ev, x)
        rows[name] = {"s": round(secs, 2), "confident_share": round(h["confident_share"], 4),
                      "domain_fid": round(domain_fid(ev, x, ref), 3)}
        return x

    def draw(model, **kw):
        return lambda: sample(model, sched, n, seed=seed, progress=False, device=dev, **kw)
    base = measure("ddim20", draw(unet, steps=20))
    measure("ddim50", draw(unet, steps=50))
    measure("dpm10", draw(unet, method="dpm", steps=10))
    measure("dpm20", draw(unet, method="dpm", steps=20))

    def bf16():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            return draw(unet, steps=20)().float()
    xb = measure("ddim20_bf16", bf16)
    cl = __import__("copy").deepcopy(unet).to(memory_format=torch.channels_last)
    measure("ddim20_channels_last", draw(cl, steps=20))
    ref_s = rows["ddim20"]["s"]
    for r in rows.values():
        r["time_ratio"] = round(r["s"] / ref_s, 3)
    rows["bf16_max_abs_diff_vs_fp32"] = round((xb - base).abs().max().item(), 4)
    return {"samples": n, "model": model_dir, "reference": f"{n_reference} MNIST test images", "device": str(dev),
            "settings": rows}


def device_card(device) -> dict:
    """What a GPU number was measured on: the device's name and memory, CUDA, torch, the host's cores."""
    import os
    import platform
    dev = torch.device(device)
    card = {"device": str(dev), "torch": torch.__version__, "host": f"{platform.machine()}, {os.cpu_count()} cores"}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        card.update(name=p.name, memory_GiB=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=f"{p.major}.{p.minor}")
    return card


def accelerator(dataset: str = "mnist", device="cuda", batches=(64, 512), repeats: int = 5,
                quality_samples: int = 1000, cpu_file=None) -> dict:
    """The prepared accelerator run: :func:`run` in float32 and bfloat16 autocast at each of ``batches``, the
    samplers of :func:`sampler_quality` on ``quality_samples`` samples, and ``vs_cpu``: each throughput at the
    CPU file's batch (``results/<dataset>/bench.json``, ``make bench``) as a multiple of the CPU's."""
    out = {"card": device_card(device), "runs": {}}
    for b in batches:
        for bf16 in (False, True):
            out["runs"][f"batch{b}_{'bf16' if bf16 else 'fp32'}"] = run(dataset, b, repeats, device=device, bf16=bf16)
    cpu_path = cpu_file or REPO / "results" / dataset / "bench.json"
    try:
        cpu = json.loads(open(cpu_path).read())
    except (OSError, ValueError):
        cpu = None
    if cpu is not None and f"batch{cpu.get('batch')}_fp32" in out["runs"]:
        same = out["runs"][f"batch{cpu['batch']}_fp32"]
        out["vs_cpu"] = {"cpu": cpu.get("machine"), "batch": cpu["batch"],
                         **{k: round(same[k] / cpu[k], 1) for k in THROUGHPUTS if cpu.get(k)}}
    if quality_samples and dataset == "mnist":
        out["sampling"] = sampler_quality(n=quality_samples, device=device)
    return out


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
    ap.add_argument("--device", default=None,
                    help="measure on this device (e.g. cuda): the accelerator run, written to bench-gpu.json "
                         "(fp32 and bf16 at batch --batch and 512, ratios to this CPU's bench.json)")
    a = ap.parse_args()
    if a.device is not None and torch.device(a.device).type != "cpu":
        if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
            ap.error(f"--device {a.device}: torch sees no CUDA device here (run `make bench` for the CPU)")
        res = accelerator(a.dataset, a.device, batches=(a.batch, 512), quality_samples=a.quality_samples)
        path = write_results(a.dataset, "bench-gpu", res, profile="full")
        print(json.dumps(res, indent=1))
        print("wrote", path)
        return
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
