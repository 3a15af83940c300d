import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_train_config, tiny_unet
from vdu.posterior import gaussian_from_checkpoints, load_posterior, make_posterior
from vdu.training import pretrain, snapshot_files


def _cfg(out, **kw):
    return tiny_train_config(out, **kw)


def test_interrupted_run_resumes_to_identical_weights(tmp_path, small_data):
    full = pretrain(_cfg(tmp_path / "a"), data=small_data, progress=False)
    pretrain(_cfg(tmp_path / "b"), data=small_data, until=3, progress=False)  # "killed" after step 3
    st = torch.load(tmp_path / "b" / "state.pt", weights_only=False)
    assert st["step"] == 3 and not (tmp_path / "b" / "model").exists()
    resumed = pretrain(_cfg(tmp_path / "b"), data=small_data, progress=False)
    a = load_file(full / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in snapshot_files(tmp_path / "a")] == [f"step_000000{i}.safetensors" for i in (4, 5, 6)]
    sa, sb = snapshot_files(tmp_path / "a"), snapshot_files(tmp_path / "b")
    assert all(torch.equal(load_file(x)[k], load_file(y)[k]) for x, y in zip(sa, sb) for k in load_file(x))
    with pytest.raises(ValueError, match="batch_size"):
        pretrain(_cfg(tmp_path / "b", batch_size=8), data=small_data, progress=False)
    with pytest.raises(ValueError, match="already at step"):
        pretrain(_cfg(tmp_path / "b", steps=4), data=small_data, progress=False)
    longer = pretrain(_cfg(tmp_path / "b", steps=8), data=small_data, progress=False,  # extend a finished run
                      overwrite_export=True)
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=False)["step"] == 8 and longer.exists()


def test_denoising_loss_decreases(tmp_path, small_data):
    cfg = _cfg(tmp_path / "c", steps=60, lr=3e-3, warmup=5, log_every=10, checkpoint_every=60, conditional=True)
    pretrain(cfg, data=small_data, progress=False)
    log = [json.loads(l) for l in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.6 * log[0]["loss"], log


def test_posterior_from_snapshots(tmp_path, small_data):
    model = pretrain(_cfg(tmp_path / "d"), data=small_data, progress=False)
    path = make_posterior(model, tmp_path / "d", k=3, progress=False)
    from vdu.models import build_unet, load_model
    pretrained = load_model(model)[0]
    post = load_posterior(path, pretrained)
    sds = [load_file(f) for f in snapshot_files(tmp_path / "d")]
    name = "conv_in.weight"
    stack = torch.stack([sd[name] for sd in sds])
    assert torch.allclose(post["mean"][name], stack.mean(0), atol=1e-5)  # stored as float16 offsets
    assert torch.allclose(post["var"][name], stack.var(0).clamp_min(1e-8), rtol=2e-3)
    assert post["k"] == 3 and (post["var"][name] > 0).all()
    with pytest.raises(ValueError, match="different architecture"):
        load_posterior(path, build_unet("mnist"))
    with pytest.raises(ValueError, match="other weights"):
        load_posterior(path, tiny_unet(seed=7))
    with pytest.raises(ValueError, match="fewer than K"):
        make_posterior(model, tmp_path / "d", k=5, progress=False, overwrite=True)


def test_posterior_from_continuations(tmp_path, small_data, monkeypatch):
    import vdu.data
    monkeypatch.setattr(vdu.data, "load_dataset", lambda *a, **k: small_data)
    import vdu.training
    monkeypatch.setattr(vdu.training, "load_dataset", lambda *a, **k: small_data)
    model = pretrain(_cfg(tmp_path / "e", k_snapshots=2), data=small_data, progress=False)
    from vdu.models import load_model
    work = tmp_path / "work"
    post = load_posterior(make_posterior(model, method="continuations", k=2, continuation_steps=2,
                                          continuation_lr=1e-2, progress=False, work_dir=work,
                                          out=tmp_path / "k2.safetensors"), load_model(model)[0])
    assert post["method"] == "continuations" and post["k"] == 2
    assert (post["var"]["conv_in.weight"] > 1e-8).any()
    assert not list(model.parent.glob(".continuation*"))       # nothing written beside the model
    first = (work / "continuation0" / "state.pt").stat().st_mtime_ns
    post3 = load_posterior(make_posterior(model, method="continuations", k=3, continuation_steps=2,
                                          continuation_lr=1e-2, progress=False, work_dir=work,
                                          out=tmp_path / "k3.safetensors"), load_model(model)[0])
    assert post3["k"] == 3 and (work / "continuation2").exists()
    assert (work / "continuation0" / "state.pt").stat().st_mtime_ns == first   # K sweep reuses finished seeds


def test_gaussian_needs_two_matching_checkpoints():
    a = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="K >= 2"):
        gaussian_from_checkpoints([a])
    with pytest.raises(ValueError, match="architecture"):
        gaussian_from_checkpoints([a, {"w": torch.zeros(4)}])


def test_posterior_from_the_model_alone(tmp_path, small_data, monkeypatch):
    """'self': continuations trained on the model's own samples; no dataset is ever loaded."""
    import vdu.training

    def no_data(*a, **k):
        raise AssertionError("the 'self' posterior must not load a dataset")
    model = pretrain(_cfg(tmp_path / "s", k_snapshots=2), data=small_data, progress=False)
    monkeypatch.setattr(vdu.training, "load_dataset", no_data)
    from vdu.models import load_model
    post = load_posterior(make_posterior(model, method="self", k=2, continuation_steps=2, continuation_lr=1e-2,
                                         self_samples=32, progress=False, work_dir=tmp_path / "w",
                                         out=tmp_path / "self.safetensors"), load_model(model)[0])
    assert post["method"] == "self" and post["k"] == 2 and (post["var"]["conv_in.weight"] > 1e-8).any()


def test_fisher_posterior_is_narrow_where_the_forget_data_is_informative():
    from vdu.models import build_scheduler
    from vdu.posterior import VAR_FLOOR, fisher_posterior
    unet = tiny_unet()
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    post = fisher_posterior(unet, build_scheduler(), x, batch_size=8)
    v = torch.cat([t.flatten() for t in post["var"].values()])
    assert ((v >= VAR_FLOOR) & (v <= 1.0)).all() and v.min() < 0.5 * v.max()
    assert all(torch.equal(post["mean"][n], p.detach()) for n, p in unet.named_parameters())
    from vdu.unlearning import unlearn
    out = unlearn(unet, x, "vdu", build_scheduler(), posterior=post, steps=2, batch_size=8, probe_every=0,
                  progress=False)
    assert out.unlearn_log.steps_done == 2


SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_train_config
from vdu.data import load_dataset
from vdu.training import pretrain
torch.set_num_threads(1)
data = load_dataset("mnist", "test").take(256, seed=0)
until = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "-" else None
accum = int(sys.argv[3]) if len(sys.argv) > 3 else 1
pretrain(tiny_train_config(sys.argv[1], grad_accum=accum), data=data, until=until, progress=False, device="cpu")
"""


def _launch(tmp_path, out, until=None, accum=1):
    """``accelerate launch`` with 2 CPU processes of the tiny pretraining run."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "train2.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    # --multi_gpu on a machine without GPUs starts the processes through torch.distributed; they run on the CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(out), str(until or "-"), str(accum)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_processes_match_one_process_and_resume(tmp_path, small_data):
    pytest.importorskip("accelerate")
    one = pretrain(_cfg(tmp_path / "one"), data=small_data, progress=False, device="cpu")
    _launch(tmp_path, tmp_path / "two")
    _launch(tmp_path, tmp_path / "killed", until=3)                 # a 2-process run stopped after step 3 ...
    assert torch.load(tmp_path / "killed" / "state.pt", weights_only=False)["step"] == 3
    _launch(tmp_path, tmp_path / "killed")                          # ... and resumed with 2 processes
    _launch(tmp_path, tmp_path / "accum", accum=2)                 # 2 processes x 2 micro-batches of 4 images
    w1 = torch.load(tmp_path / "one" / "state.pt", weights_only=False)["model"]
    for run in ("two", "killed", "accum"):
        w2 = torch.load(tmp_path / run / "state.pt", weights_only=False)["model"]
        diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
        assert diff < 1e-4, (run, diff)     # same global batch and noise: DDP's average is the one-process step
    assert (tmp_path / "two" / "model" / "unet").is_dir() and one.exists()
    logs = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert [(r["step"], r["processes"]) for r in logs] == [(2, 2), (4, 2), (6, 2)]   # two processes, one log


def test_gradient_accumulation_takes_the_same_step(tmp_path, small_data):
    w = {}
    for k in (1, 4):
        pretrain(_cfg(tmp_path / f"acc{k}", steps=3, grad_accum=k), data=small_data, progress=False, device="cpu")
        w[k] = torch.load(tmp_path / f"acc{k}" / "state.pt", weights_only=False)["model"]
        losses = [json.loads(line)["loss"] for line in open(tmp_path / f"acc{k}" / "log.jsonl")]
        w[k, "loss"] = losses
    diff = max((w[1][n] - w[4][n]).abs().max().item() for n in w[1])
    first = load_file(snapshot_files(tmp_path / "acc4")[0])                     # the weights after step 1
    moved = max((w[4][n] - first[n]).abs().max().item() for n in first)
    assert moved > 1e-4 and diff < 1e-5, (moved, diff)   # four chunks of 4 images: the step of one batch of 16
    assert w[1, "loss"] == pytest.approx(w[4, "loss"], rel=1e-5)
    from vdu.training import ConfigError
    for bad in (0, 3):                          # not a positive divisor of batch_size 16
        with pytest.raises(ConfigError, match="grad_accum"):
            pretrain(_cfg(tmp_path / f"bad{bad}", grad_accum=bad), data=small_data, progress=False)


def test_bf16_autocast_trains_and_an_unknown_precision_is_refused(tmp_path, small_data):
    pytest.importorskip("accelerate")
    losses = {}
    for mp in ("no", "bf16", "no"):     # several runs in one process, precision changing between them
        pretrain(_cfg(tmp_path / f"{mp}{len(losses)}", steps=2, mixed_precision=mp), data=small_data, progress=False,
                 device="cpu")
        losses[f"{mp}{len(losses)}"] = [json.loads(line)["loss"] for line in open(tmp_path / f"{mp}{len(losses)}" / "log.jsonl")]
    assert losses["no0"] == losses["no2"]                   # deterministic in float32
    assert losses["bf161"] != losses["no0"] and all(abs(a - b) < 0.05 * b for a, b in zip(losses["bf161"], losses["no0"]))
    from vdu.training import ConfigError
    with pytest.raises(ConfigError, match="mixed_precision"):
        pretrain(_cfg(tmp_path / "fp8", mixed_precision="fp8"), data=small_data, progress=False)


@pytest.mark.parametrize("capability, warns", [("AVX2", True), ("AVX512", False)])
def test_bf16_on_a_cpu_without_native_bfloat16_warns(tmp_path, small_data, monkeypatch, capability, warns):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain(_cfg(tmp_path / "run", steps=1, mixed_precision="bf16"), data=small_data, progress=False, device="cpu")
    assert any("without native bfloat16" in str(w.message) for w in caught) == warns


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_its_decay_rule_with_and_without_warmup(tmp_path, small_data, warmup):
    """The exported EMA is the recursion e_t = d_t e_(t-1) + (1 - d_t) w_t over the raw weights of every step:
    d_t ramps up as 1 - t^(-3/4) with warm-up; without it (a continuation from a trained model) d_t is the
    ceiling from the second step on, so the EMA averages over about 1 / (1 - d) steps from the start."""
    base = pretrain(_cfg(tmp_path / "base"), data=small_data, progress=False)
    steps, ceiling = 6, 0.9
    cont = pretrain(_cfg(tmp_path / "cont", init=str(base), steps=steps, lr=1e-2, ema_decay=ceiling,
                         ema_warmup=warmup, k_snapshots=steps, snapshot_every=1), data=small_data, progress=False)
    raw = [load_file(f) for f in snapshot_files(tmp_path / "cont")]
    assert len(raw) == steps

    def recursion(ramp):
        ema = {k: v.clone() for k, v in raw[0].items()}  # the first update copies the weights (decay 0)
        for t in range(2, steps + 1):
            d = min(1 - t ** -0.75, ceiling) if ramp else ceiling
            ema = {k: d * ema[k] + (1 - d) * raw[t - 1][k] for k in ema}
        return ema

    got = load_file(cont / "unet" / "diffusion_pytorch_model.safetensors")  # stored as float16
    close = lambda ema: all(torch.allclose(got[k].float(), ema[k], rtol=2e-3, atol=1e-5) for k in ema)
    assert close(recursion(warmup)) and not close(recursion(not warmup))
    with pytest.raises(ValueError, match="--no-ema-warmup" if not warmup else "--ema-warmup"):
        pretrain(_cfg(tmp_path / "cont", init=str(base), steps=steps + 2, lr=1e-2, ema_decay=ceiling,
                      ema_warmup=not warmup, k_snapshots=steps, snapshot_every=1), data=small_data, progress=False)


def test_min_snr_weighting_turns_down_only_the_nearly_clean_timesteps(tmp_path, small_data):
    from vdu.models import build_scheduler
    from vdu.training import ConfigError, timestep_loss_weights
    sched = build_scheduler()
    abar = sched.alphas_cumprod.double()
    snr = abar / (1 - abar)
    w = timestep_loss_weights(sched, "min-snr", 5.0).double()
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr, rtol=1e-5)
    assert (w[snr <= 5] == 1).all() and (w[snr > 5] < 1).all() and w[0] < 1e-3   # t = 1 nearly ignored
    assert torch.equal(timestep_loss_weights(sched), torch.ones(len(abar)))
    with pytest.raises(ValueError, match="weighting"):
        timestep_loss_weights(sched, "p2")

    def losses(name, **kw):
        pretrain(_cfg(tmp_path / name, steps=3, **kw), data=small_data, progress=False, device="cpu")
        return [json.loads(line)["loss"] for line in open(tmp_path / name / "log.jsonl")]
    plain = losses("simple")
    assert losses("huge-gamma", loss_weighting="min-snr", snr_gamma=1e12) == pytest.approx(plain, rel=1e-6)
    weighted = losses("min-snr", loss_weighting="min-snr", snr_gamma=0.01)     # every timestep turned down
    assert all(a < 0.5 * b for a, b in zip(weighted, plain)), (weighted, plain)
    with pytest.raises(ValueError, match="loss_weighting"):                      # a resume keeps its weighting
        pretrain(_cfg(tmp_path / "min-snr", steps=5), data=small_data, progress=False)
    for bad in (dict(loss_weighting="p2"), dict(snr_gamma=0), dict(snr_gamma=float("nan"))):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            pretrain(_cfg(tmp_path / "bad", **bad), data=small_data, progress=False)
