"""Unlearning under ``accelerate launch`` with 2 CPU processes: each process takes half of every batch and
the gradients are averaged, so one step is the one-process step on the mean of the two halves' gradients;
every process ends with the same weights, logs and dual variables; one process saves."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_unet
from vdu.data import UnlearnData
from vdu.methods import Batch, get_method
from vdu.models import build_scheduler, load_model
from vdu.unlearning import split_options, step_seed, unlearn

# (method, options): methods whose step reaches the average differently — a plain loss (NegGrad), a combination
# of two gradients (SISS's fixed-norm forget gradient), per-group means and dual variables updated from the
# batch (FU), a frozen teacher with bounded plasticity (VDU); the "-sgd" runs take one plain gradient step,
# recomputed by hand below
RUNS = {"neggrad-sgd": ("neggrad", dict(optimizer="sgd", grad_clip=None, lr=1e-2, steps=1)),
        "siss-sgd": ("siss", dict(optimizer="sgd", grad_clip=None, lr=1e-2, steps=1, forget_norm=0.5)),
        "fu-sgd": ("fu", dict(optimizer="sgd", grad_clip=None, lr=1e-2, steps=1, groups=4, lam0=0.5)),
        "siss": ("siss", dict(steps=3, forget_norm=0.5)),
        "fu": ("fu", dict(steps=4, dual_lr=0.5, dual_every=2, forget_ratio=5.0, groups=4)),
        "vdu": ("vdu", dict(steps=3, stability="function", replay_samples=4, replay_ddim_steps=2, plasticity_norm=1.0)),
        "stopped": ("neggrad", dict(steps=50, lr=1e-2, stop_forget_ratio=1.05)),
        "accum": ("vdu", dict(steps=2, stability="function", replay_samples=4, replay_ddim_steps=2, grad_accum=2))}
LOOP = dict(batch_size=4, probe_every=1, probe_size=4, progress=False, seed=3)

SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from test_unlearning_processes import RUNS, LOOP, data
from conftest import tiny_unet
from vdu.models import build_scheduler
from vdu.unlearning import unlearn
torch.set_num_threads(1)
out = sys.argv[1]
for name, (method, opts) in RUNS.items():
    m = unlearn(tiny_unet(), data(), method, build_scheduler(), save_to=out + "/" + name, **LOOP, **opts)
    rank = torch.distributed.get_rank()
    torch.save({{"weights": [p.detach() for p in m.parameters()], "log": m.unlearn_log.to_dict()}},
               out + f"/{{name}}-rank{{rank}}.pt")
"""


def data(n_retain=8):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    r = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    return UnlearnData(x, retain=r[:n_retain], forget_class=1)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("unlearn2")
    script = out / "unlearn2.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    # --multi_gpu on a machine without GPUs starts the processes through torch.distributed; they run on the CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(out)]
    # CPU processes even where GPUs exist (the test compares with a one-process CPU computation)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _halves(name, monkeypatch):
    """What each of the 2 processes computes in the first step of run ``name``: the method, the weights before,
    and per process the step's output (loss terms with their graphs)."""
    import vdu.methods.fu as fu
    method, opts = RUNS[name]
    unet, sched, d = tiny_unet(), build_scheduler(), data()
    w0 = [p.detach().clone() for p in unet.parameters()]
    _, mcfg = split_options(method, {k: v for k, v in opts.items() if k not in ("optimizer", "grad_clip", "lr", "steps")})
    m = get_method(method)(unet, d, mcfg, sched, None)
    idx = torch.randperm(8, generator=torch.Generator().manual_seed(LOOP["seed"]))[:4]
    ridx = torch.randperm(8, generator=torch.Generator().manual_seed(LOOP["seed"] + 1))[:4]
    # FU's per-group means divide by the group's count over both processes
    counts = torch.nn.functional.one_hot(idx % 4, 4).sum(0).float()
    monkeypatch.setattr(fu, "processes", lambda: 2)
    monkeypatch.setattr(fu, "sum_over_processes", lambda t: counts.to(t.dtype))
    outs = []
    for rank in (0, 1):
        part, rpart = idx[rank::2], ridx[rank::2]
        retain = d.retain[rpart] if "retain" in m.needs else None
        outs.append(m.loss(unet, Batch(d.forget[part], None, retain, None,
                                       torch.Generator().manual_seed(step_seed(LOOP["seed"], rank)), 8, part)))
    return m, unet, w0, outs


def _grad(loss, unet):
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, list(unet.parameters()), retain_graph=True, allow_unused=True),
                            unet.parameters())]


def _mean(a, b):
    return [(x + y) / 2 for x, y in zip(a, b)]


@pytest.mark.parametrize("name", ["neggrad-sgd", "siss-sgd", "fu-sgd"])
def test_a_two_process_step_is_the_step_on_the_whole_batch(two_process_runs, name, monkeypatch):
    """The 2-process SGD step recomputed in one process from the two halves of the batch: the mean gradient
    (NegGrad, FU with the groups' counts over both halves); SISS's forget gradient is averaged first and only
    then rescaled to its fixed norm."""
    got = torch.load(two_process_runs / f"{name}-rank0.pt")["weights"]
    m, unet, w0, outs = _halves(name, monkeypatch)
    if name == "siss-sgd":
        gr = _mean(*(_grad(o["L_r"], unet) for o in outs))
        gf = _mean(*(_grad(o["L_f"], unet) for o in outs))
        c = 0.5 / torch.sqrt(sum((x ** 2).sum() for x in gf))
        grad = [a - m.config.forget_weight * c * b for a, b in zip(gr, gf)]
        # rescaling each half before the average is a different step: the test tells the two apart
        per_half = [_grad(o["L_f"], unet) for o in outs]
        wrong = _mean(*([a - m.config.forget_weight * 0.5 / torch.sqrt(sum((x ** 2).sum() for x in h)) * b
                         for a, b in zip(gr, h)] for h in per_half))
    else:
        grad = _mean(*(_grad(o["loss"], unet) for o in outs))
        wrong = _grad(outs[0]["loss"], unet)                            # process 0's half alone
    lr = RUNS[name][1]["lr"]
    want = [w - lr * g for w, g in zip(w0, grad)]
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) < 1e-6
    other = [w - lr * g for w, g in zip(w0, wrong)]
    assert max((a - b).abs().max().item() for a, b in zip(got, other)) > 1e-5


@pytest.mark.parametrize("name", list(RUNS))
def test_every_process_holds_the_same_weights_logs_and_duals(two_process_runs, name):
    r0, r1 = (torch.load(two_process_runs / f"{name}-rank{r}.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))
    same = lambda k: json.dumps(r0["log"][k]) == json.dumps(r1["log"][k])      # noqa: E731 (NaN == NaN here)
    assert same("steps") and same("duals") and same("probes")
    assert r0["log"]["processes"] == 2
    if name == "stopped":          # the stop rule ended the run on the same step in both processes
        assert r0["log"]["stop_reason"] == "stop_rule" and 1 <= r0["log"]["steps_done"] < 50
    else:
        assert r0["log"]["steps_done"] == RUNS[name][1]["steps"]
    w0 = [p.detach() for p in tiny_unet().parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(r0["weights"], w0))                 # the run moved them
    if name == "fu":
        assert len(r0["log"]["duals"]) == 2                  # the dual steps ran, on the processes' mean statistics
    # one process saved the folder (float16 weights), and it holds the run's weights
    saved, _ = load_model(two_process_runs / name)
    assert all(torch.equal(a, b.half().float()) for a, b in zip(saved.parameters(), r0["weights"]))
    assert json.loads((two_process_runs / name / "unlearn.json").read_text())["processes"] == 2


def test_a_batch_that_cannot_be_split_over_the_processes_is_refused(monkeypatch):
    import vdu.unlearning as U
    monkeypatch.setattr(U, "_processes", lambda device, model_device: (4, 0, torch.device("cpu")))
    d = UnlearnData(torch.rand(3, 1, 28, 28) * 2 - 1)
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        unlearn(tiny_unet(), d, "neggrad", progress=False)      # 3 forget images for 4 processes
    with pytest.raises(ValueError, match="forget batch of 6 images cannot be split over 4"):
        unlearn(tiny_unet(), torch.rand(8, 1, 28, 28) * 2 - 1, "neggrad", batch_size=6, progress=False)


def test_bf16_autocast_unlearns_close_to_float32():
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    runs = {mp: unlearn(tiny_unet(), x, "neggrad", steps=2, batch_size=4, probe_every=1, probe_size=4, lr=1e-3,
                        mixed_precision=mp, progress=False).unlearn_log for mp in ("no", "bf16")}
    a, b = ([s["loss"] for s in runs[mp].steps] for mp in ("no", "bf16"))
    assert a != b and all(abs(u - v) < 0.05 * abs(u) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="mixed_precision"):
        unlearn(tiny_unet(), x, "neggrad", mixed_precision="fp16", progress=False)


@pytest.mark.parametrize("method,opts,n_retain", [("neggrad", {}, 8), ("siss", {"forget_norm": None}, 8),
                                                   ("siss", {"forget_norm": None}, 2)])
def test_gradient_accumulation_is_the_step_of_its_micro_batches(method, opts, n_retain):
    """grad_accum=2 in one process: one SGD step on the mean of the gradients of the batch's two halves, each
    drawing its t and eps from the step's generator in turn (the 2-process step draws them per process); a
    retain batch smaller than the forget batch is split into as many equal parts."""
    sgd = dict(optimizer="sgd", grad_clip=None, lr=1e-2, steps=1)
    got = unlearn(tiny_unet(), data(n_retain), method, build_scheduler(), grad_accum=2, **LOOP, **sgd, **opts)
    unet, d = tiny_unet(), data(n_retain)
    _, mcfg = split_options(method, opts)
    m = get_method(method)(unet, d, mcfg, build_scheduler(), None)
    g = torch.Generator().manual_seed(LOOP["seed"])       # one process: the batches' generator draws t and eps too
    idx = torch.randperm(8, generator=g)[:4]
    ridx = torch.randperm(n_retain, generator=torch.Generator().manual_seed(LOOP["seed"] + 1))[:4]
    state = g.get_state()
    outs = [m.loss(unet, Batch(d.forget[i], None, d.retain[j] if "retain" in m.needs else None, None, g, 8, i))
            for i, j in zip(idx.chunk(2), ridx.chunk(2))]
    grad = _mean(*(_grad(o["loss"], unet) for o in outs))
    whole = _grad(m.loss(unet, Batch(d.forget[idx], None, d.retain[ridx] if "retain" in m.needs else None, None,
                                     g.set_state(state) or g, 8, idx))["loss"], unet)
    for p, a, w in zip(got.parameters(), grad, unet.parameters()):
        assert torch.allclose(p.detach(), w.detach() - 1e-2 * a, atol=1e-6)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grad, whole))   # other draws than one batch of 4
    log = got.unlearn_log.steps[0]
    assert log["forget_loss"] == pytest.approx(sum(o["forget_loss"].item() for o in outs) / 2, rel=1e-5)


def test_gradient_accumulation_is_refused_where_micro_batches_do_not_add_up():
    for method, opts in (("fu", {"groups": 2}), ("siss", {"forget_norm": 0.5}),
                         ("vdu", {"stability": "function", "plasticity_norm": 1.0})):
        with pytest.raises(ValueError, match="grad_accum=1"):
            unlearn(tiny_unet(), data(), method, build_scheduler(), grad_accum=2, **LOOP, steps=1, **opts)
    with pytest.raises(ValueError, match="grad_accum=3"):
        unlearn(tiny_unet(), data(), "neggrad", build_scheduler(), grad_accum=3, **LOOP, steps=1)
    with pytest.raises(ValueError, match="grad_accum"):
        unlearn(tiny_unet(), data(), "neggrad", build_scheduler(), grad_accum=0, **LOOP, steps=1)
