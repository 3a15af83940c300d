# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -papermill
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] tags=[]
# # 4 · Class unlearning: every method on the same model, seeds and evaluator
#
# **Read first:** `pretrain` (the base models, the evaluator, the metrics) and `vdu_unlearning` (VDU and
# the loop's stop rule and guards). **What this shows:** the baselines a reader compares with, run
# through the one loop `vdu.unlearning.unlearn` on the same base model, the same seed bank and the same
# evaluator, split by the data each method may touch; a Pareto plot over each method's strength; and a
# relearning attack. **Cost:** smoke profile a few minutes (tests); the full profile
# (`params/benchmark-full.yaml`, `make run-all`) several hours on one CPU thread.
#
# **Datasets.** The cells below run on MNIST by default (an unconditional and a class-conditional model). The
# same notebook runs on CIFAR-10 and Tiny ImageNet (`make run-all DATASETS=cifar10`): the dataset's block
# `params/benchmark-<dataset>.yaml` replaces the model (one unconditional base), the entries (the paper's VDU,
# `vdu-function` and the two baselines that did best on MNIST's unconditional model), the classes (CIFAR-10's
# frog first, the paper's example) and the folder of finished rows.
#
# ## The methods, in one line each
#
# Notation: $\epsilon_\theta(x_t,t,c)$ the model's noise prediction at $x_t=\sqrt{\bar\alpha_t}x_0+\sqrt{1-\bar\alpha_t}\,\epsilon$,
# $\theta^*$ the pretrained weights and $\epsilon^*$ their frozen prediction, $c_f$ the forgotten class,
# $\varnothing$ the null class of a conditional model, $L_\text{simple}(D)=\mathbb E_{x_0\in D,t,\epsilon}\|\epsilon-\epsilon_\theta(x_t,t)\|^2$.
#
# | method | data | loss per step |
# |---|---|---|
# | `vdu` (paper) | $D_f$ + posterior | $\gamma\sum_i \frac{(\theta_i-\mu^*_i)^2}{2\sigma^{*2}_i} - (1-\gamma)\,L_\text{simple}(D_f)$ |
# | `vdu`, `stability="function"` | $D_f$ + replay | $\gamma\,\mathbb E_{x_0\sim p_{\theta^*}}\|\epsilon_\theta(x_t,t)-\epsilon^*(x_t,t)\|^2 - (1-\gamma)\,L_\text{simple}(D_f)$ |
# | `neggrad` | $D_f$ | $-L_\text{simple}(D_f)$ |
# | `amnesia` (Selective Amnesia) | none (replay) | $L_\text{simple}(u\sim\mathcal U[-1,1], c_f) + L_\text{simple}(\text{replay}) + \lambda\sum_i F_i(\theta_i-\theta^*_i)^2$ |
# | `esd` | concept | $\big\|\epsilon_\theta(x_t,c_f)-[\epsilon^*(x_t,\varnothing)-\eta(\epsilon^*(x_t,c_f)-\epsilon^*(x_t,\varnothing))]\big\|^2$ |
# | `finetune` | $D_r$ | $L_\text{simple}(D_r)$ |
# | `salun` | $D_f$ + $D_r$ | mask $m=\mathbb 1[|\nabla L_\text{simple}(D_f)|\ge q_{50\%}]$; $\|\epsilon_\theta(x_t,c_f)-\text{sg}\,\epsilon_\theta(x_t,c')\|^2+\alpha L_\text{simple}(D_r)$ |
# | `erasediff` | $D_f$ + $D_r$ | $g = \nabla L_\text{simple}(D_r) + \lambda\nabla\|\epsilon_\theta(x^f_t,t)-u\|^2$, $\lambda=\max(\eta-\cos(g_r,g_f),0)$ |
# | `siss` | $D_f$ + $D_r$ | importance-weighted $L_r - s\,L_f$ on one mixture $x_t$, forget gradient at a fixed norm |
# | `ru` | concept | ESD's target with the guidance $\alpha=\lambda/(1-\lambda)$ set by the dual of $\mathrm{KL}(p\|q(\cdot\mid c_f))\ge b$ |
# | `fu` | $D_f$ + $D_r$ | $L_\text{simple}(D_r)+\frac{w-\lambda}{1-w}L_\text{simple}(D_f)$, $\lambda\in[0,w]$ set by the dual of $L_\text{simple}(D_f)\ge\rho\,L^*$ |
#
# The function-space VDU term is frozen-teacher distillation on replay samples: the generative-replay
# term of Selective Amnesia and the frozen-teacher target of ESD at $\eta=0$. What differs is the push:
# gradient ascent on $D_f$ (VDU), a surrogate target (SA) or negative guidance (ESD).
#
# **The columns.** PUL $=(N_\text{before}-N_\text{after})/N_\text{before}$ counts evaluator labels of the
# forgotten class among seed-bank samples before and after (same noise); the forget share is that class's
# share after; u-FID is the domain FID of the samples against real retained-class test images (ratio to
# the pretrained model's); the confident share counts samples the evaluator labels with $p\ge0.9$. Every
# method shares one stop rule (stop when the forget loss on a fixed probe reaches a ratio of its
# pretrained value) and one step budget; the strength knob of the Pareto plot is that ratio.
#
# **Relearning attack.** Fine-tune each unlearned model on 16 forget images for 50 steps, and the pretrained
# model with the same attack (same images, steps and seed). Fine-tuning on one class raises that class's share
# in *any* model, so the column divides the attacked unlearned model's forget share by the attacked pretrained
# model's: 0 means nothing came back, 1 means the attack restores as much as it adds to a model that never
# forgot (unlearning gave no resistance). The results file also keeps the raw share after the attack and its
# ratio to the pretrained model's unattacked share.

# %% tags=["parameters"]
profile = "smoke"          # "full" writes results/mnist/benchmark.json; anything else a git-ignored subfolder
dataset = "mnist"
models = {"uncond": "checkpoints/mnist/ddpm", "cond": "checkpoints/mnist/ddpm-cond"}   # name -> model folder
evaluator_dir = None       # default checkpoints/<dataset>/evaluator
n_forget = 256             # forget-class training images (D_f)
n_retain = 512             # retained-class training images (D_r), for the methods that may use them
n_reference = 500          # real retained-class test images for u-FID
nll_images = 16            # forget / retain test images for the NLL bound (0: no NLL)
nll_timesteps = 10
n_samples = 32             # seed-bank samples per model (full: >= 500, so one sample is < 2 PUL points)
sample_steps = 5           # DDIM steps of those samples
seed = 0
loop = dict(steps=2, batch_size=16, probe_every=1, stop_forget_ratio=1.3)   # shared by every method
entries = {                # name -> method + its options + which models it runs on
    "vdu": dict(method="vdu", stability="posterior", gamma=0.5, lr=1e-6, models=["uncond"]),
    "vdu-function": dict(method="vdu", stability="function", gamma=0.8, lr=3e-5, replay_samples=8,
                         replay_ddim_steps=2, models=["uncond", "cond"]),
    "neggrad": dict(method="neggrad", lr=3e-5, models=["uncond", "cond"]),
    "amnesia": dict(method="amnesia", lr=1e-4, replay_samples=8, replay_ddim_steps=2, fisher_samples=4,
                    models=["cond"]),
    "esd": dict(method="esd", lr=1e-5, sample_steps=4, models=["cond"]),
    "finetune": dict(method="finetune", lr=1e-4, models=["uncond", "cond"]),
    "salun": dict(method="salun", lr=3e-5, mask_batches=1, mask_batch_size=16, models=["uncond", "cond"]),
    "erasediff": dict(method="erasediff", lr=3e-5, models=["uncond", "cond"]),
    "siss": dict(method="siss", lr=5e-5, models=["uncond", "cond"]),
    "ru": dict(method="ru", lr=1e-5, kl_min=4.0, sample_steps=4, models=["cond"]),
    "fu": dict(method="fu", lr=3e-5, forget_mass=0.1, forget_ratio=1.3, models=["uncond", "cond"]),
}
first_class = 1            # every entry runs this class first (the paper's MNIST example)
subset = []                # ... then these (full: [8, 0])
all_classes = []           # ... or all of these for forget-only entries whose first_class row is `at_target` (whole interval)
target = dict(pul=95.0, u_fid_ratio=1.2)
pareto = {"neggrad": [1.1, 1.3]}   # entry -> stop_forget_ratio values (the strength knob), on first_class / uncond
relearn_images = 16
relearn_steps = 2          # full: 50
relearn_lr = 1e-4
threads = 1
cache_dir = None           # rows computed earlier are read from here, so an interrupted run resumes (full: runs/...)
device = "cpu"             # "cuda": the GPU profile (params/benchmark-gpu.yaml); the evaluator stays on the CPU

# %% tags=[]
import dataclasses
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from vdu.cards import grid_array
from vdu.data import class_split, load_dataset, to_uint8
from vdu.evaluation import EvalConfig, evaluate, samples_needed
from vdu.evaluator import load_evaluator
from vdu.experiments import relearn, unlearn_and_measure
from vdu.methods import get_method
from vdu.models import load_model, null_class
from vdu.notebook import check_params
from vdu.results import REPO, RowCache, folder_digest, machine, save_figure, source_digest, write_results
from vdu.unlearning import LoopConfig

check_params(dict(n_forget=(n_forget, int, 1), n_retain=(n_retain, int, 0), n_reference=(n_reference, int, 1),
                  nll_images=(nll_images, int, 0), n_samples=(n_samples, int, 1), sample_steps=(sample_steps, int, 1),
                  relearn_images=(relearn_images, int, 1), relearn_steps=(relearn_steps, int, 0),
                  threads=(threads, int, 1)))
for name, e in entries.items():        # typos fail here, not after an hour: every option must exist
    m = get_method(e["method"])
    unknown = set(e) - {"method", "models"} - set(m.Config.__dataclass_fields__) - set(LoopConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"entry {name!r}: {sorted(unknown)} are options neither of method {e['method']!r} nor of "
                         f"the loop (vdu.unlearning.LoopConfig)")
    if set(e["models"]) - set(models):
        raise ValueError(f"entry {name!r} names models {e['models']} but only {sorted(models)} are configured")
    for kind in e["models"]:           # the paper's VDU needs the model's K-checkpoint posterior file
        folder = Path(models[kind]) if Path(models[kind]).is_absolute() else REPO / models[kind]
        if e.get("stability", getattr(m.Config, "stability", None)) == "posterior" and \
                not (folder / "posterior.safetensors").exists():
            raise FileNotFoundError(f"entry {name!r} needs the posterior of {models[kind]} ({folder / 'posterior.safetensors'} "
                                    f"is missing): make it with `python -m vdu posterior {models[kind]} --run-dir "
                                    f"RUN_FOLDER`, or leave the entry out")
torch.set_num_threads(threads)
t_start = time.time()
evaluator = load_evaluator(REPO / (evaluator_dir or f"checkpoints/{dataset}/evaluator"))
train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
evaluation = EvalConfig(n_samples, "ddim", sample_steps, seed, nll_timesteps if nll_images else 0)
bases = {}
for kind, folder in models.items():
    path = Path(folder) if Path(folder).is_absolute() else REPO / folder
    unet, sched = load_model(path, device=device)
    post = path / "posterior.safetensors"
    labels = None if null_class(unet) is None else torch.arange(n_samples) % null_class(unet)
    t0 = time.time()
    xs = evaluation.sample(unet, sched, class_labels=labels)       # the "before" samples, cached for every class
    bases[kind] = dict(unet=unet, sched=sched, posterior=post if post.exists() else None, labels=labels, samples=xs,
                       sample_s=round(time.time() - t0, 1))
    print(f"{kind}: {folder}, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, "
          f"{'conditional' if labels is not None else 'unconditional'}; {n_samples} samples in {bases[kind]['sample_s']} s")
print(machine())
# every row depends on these (and on its own method, options and class): rows on disk with the same key are reused
cache = RowCache(None)
if cache_dir:
    cache = RowCache(REPO / cache_dir, evaluation=dataclasses.asdict(evaluation), code=source_digest(),
                     models={k: folder_digest(REPO / f) for k, f in models.items()},
                     evaluator=folder_digest(REPO / (evaluator_dir or f"checkpoints/{dataset}/evaluator")),
                     data=dict(dataset=dataset, file=train.name, n=len(train), n_forget=n_forget, n_retain=n_retain,
                               n_reference=n_reference, nll_images=nll_images))

# %% [markdown] tags=[]
# ## One row = one `unlearn` call, then the same evaluation
#
# The pretrained model's samples do not depend on the forgotten class, so they are drawn once per model
# above and scored per class here (`vdu.evaluation.measure`); every unlearned model is sampled from the
# same seed bank. A conditional model is sampled with prompts $i \bmod 10$, so its forget share is the
# share of the forgotten class over all prompts.

# %% tags=[]
splits, befores = {}, {}


def class_data(kind, c):
    if c not in splits:
        splits[c] = class_split(train, test, c, n_forget, n_retain=n_retain, n_reference=n_reference,
                                nll_images=nll_images, seed=seed)
    if (kind, c) not in befores:
        b = bases[kind]
        befores[kind, c] = evaluate(b["unet"], b["sched"], evaluator, evaluation, splits[c], nll=bool(nll_images),
                                    samples=b["samples"])[0]
    return splits[c], befores[kind, c]


def attacked_share(model, kind, c, data):
    """Forget share of ``model`` after the relearning attack (fine-tuning on the first forget images)."""
    b = bases[kind]
    r = relearn(model, b["sched"], data.forget[:relearn_images], relearn_steps, relearn_lr, seed=seed,
                class_label=c if null_class(model) is not None else None)
    return evaluate(r, b["sched"], evaluator, evaluation, data, nll=False, class_labels=b["labels"])[0]["forget_share"]


refs = {}                                   # (model, class) -> the attacked pretrained model's forget share
ref_cache = RowCache(cache.folder, **cache.context)   # the same folder; its reads are not counted as method rows


def relearn_reference(kind, c):
    """The same attack on the pretrained model: the forget share a model that never forgot reaches."""
    if (kind, c) not in refs:
        spec = dict(entry="pretrained-relearn", kind=kind, c=c, seed=seed,
                    relearn=[relearn_images, relearn_steps, relearn_lr])
        refs[kind, c] = ref_cache.row(lambda: dict(forget_share=attacked_share(
            bases[kind]["unet"], kind, c, class_data(kind, c)[0])), **spec)["forget_share"]
    return refs[kind, c]


def with_attack(r):
    """Add the relearning column: the attacked forget share over the attacked pretrained model's (None when the
    attacked pretrained model draws none of the class: the ratio is undefined)."""
    if not relearn_steps:
        return r
    ref = relearn_reference(r["model"], r["forget_class"])
    return {**r, "relearn_pretrained_share": ref,
            "relearn_vs_pretrained": r["relearn_forget_share"] / ref if ref > 0 else None}


def run(name, kind, c, grid=False, **extra):
    """One row; with ``grid`` also the first 36 seed-bank samples of the unlearned model (the figure below)."""
    e = {k: v for k, v in entries[name].items() if k not in ("method", "models")}
    spec = dict(entry=entries[name], kind=kind, c=c, extra=extra, loop=loop, seed=seed, grid=grid,
                relearn=[relearn_images, relearn_steps, relearn_lr])
    hit = cache.get(with_tensor=grid, **spec)
    if hit is not None:
        return hit
    b = bases[kind]
    data, before = class_data(kind, c)
    if "retain" not in get_method(entries[name]["method"]).needs:
        data = dataclasses.replace(data, retain=None, retain_labels=None)   # forget-only methods never see D_r
    row, m = unlearn_and_measure(b["unet"], b["sched"], evaluator, data, before, {**loop, **e, "seed": seed, **extra},
                                 evaluation, b["posterior"], entries[name]["method"], nll=bool(nll_images),
                                 name=name, return_model=True, class_labels=b["labels"])
    needs = get_method(entries[name]["method"]).needs
    row.update(model=kind, data="retain" if "retain" in needs else "forget-only")
    if relearn_steps:
        row["relearn_forget_share"] = attacked_share(m, kind, c, data)
        row["relearn_fraction"] = row["relearn_forget_share"] / max(before["forget_share"], 1e-9)
    if grid:        # the seed bank is per sample: these are the first 36 of the evaluation's samples
        xs = to_uint8(dataclasses.replace(evaluation, n_samples=36).sample(       # uint8: a quarter of the disk
            m, b["sched"], class_labels=None if b["labels"] is None else torch.arange(36) % null_class(m)))
    else:
        xs = None
    cache.put(row, xs, **spec)
    return row, xs


def ci(r, k, fmt="{:.1f}"):
    v = r.get(k)
    return f"[{fmt.format(v[0])}, {fmt.format(v[1])}]" if v else ""


def show(r):
    print(f"{r['model']:>6} {r['config']:>13} class {r['forget_class']}: PUL {r['pul']:6.1f}% {ci(r, 'pul_ci')}  forget share "
          f"{r['forget_share_before']:.3f} -> {r['forget_share_after']:.3f}  u-FID x{r['u_fid_ratio']:.2f}  confident "
          f"{r['confident_share_before']:.2f} -> {r['confident_share_after']:.2f}  relearn "
          f"{r.get('relearn_vs_pretrained') if r.get('relearn_vs_pretrained') is not None else float('nan'):.2f}  "
          f"({r['steps']} steps, {r['stop']}, {r['unlearn_s']} s)")

# %% [markdown] tags=[]
# **How many samples a target needs.** With the pretrained model drawing the forgotten class at share $s$, a
# measured PUL of 99% excludes 95% only when the Wilson interval of the surviving fraction, over the
# $s\,n$ forget-class samples, stays below 5% (`vdu.evaluation.samples_needed`):

# %% tags=[]
for kind in models:
    s0 = class_data(kind, first_class)[1]["forget_share"]
    print(f"{kind}: forget share {s0:.3f} -> {samples_needed(s0) if s0 > 0 else 'inf'} samples to tell PUL 99% from 95% "
          f"({n_samples} used here)")

# %% tags=[]
def at_target(r):      # the whole interval: PUL's lower end and u-FID's upper end (as the README's VDU table)
    fid_hi = (r.get("u_fid_after_ci") or [r["u_fid_after"]])[-1] / r["u_fid_before"]
    return (r.get("pul_ci") or [r["pul"]])[0] >= target["pul"] and fid_hi <= target["u_fid_ratio"]


table, grids, firsts = [], {}, {}
for name, e in entries.items():     # the first class of every entry first: a run stopped early (its rows are
    for kind in e["models"]:        # kept) already compares every method on one class
        row, grids[kind, name] = run(name, kind, first_class, grid=True)
        firsts[name, kind] = with_attack(row)
        show(firsts[name, kind])
for name, e in entries.items():
    for kind in e["models"]:
        row = firsts[name, kind]
        table.append(row)
        more = all_classes if (at_target(row) and row["data"] == "forget-only") else subset
        for c in [c for c in more if c != first_class]:
            table.append(with_attack(run(name, kind, c)[0]))
            show(table[-1])

# %% [markdown] tags=[]
# ## The table, split by data access
#
# Means over the classes each entry ran (the class count is in the last column); the per-class rows, each
# with its 95% bootstrap intervals (PUL paired over the same seed-bank samples; shares and u-FID resampled
# over samples), are in the results file. "At target" counts rows whose whole intervals meet the target
# (PUL's lower end above it, u-FID's upper end within its ratio), not just the points.

# %% tags=[]
summary = []
for kind in models:
    for access in ("forget-only", "retain"):
        for name in entries:
            rs = [r for r in table if r["model"] == kind and r["config"] == name and r["data"] == access]
            if not rs:
                continue
            def mean(k):          # over the rows that have the value (None where none has it)
                vals = [r[k] for r in rs if r.get(k) is not None]
                return sum(vals) / len(vals) if vals else None
            s = dict(model=kind, data=access, entry=name, method=entries[name]["method"], classes=len(rs),
                     pul=mean("pul"), forget_share=mean("forget_share_after"), u_fid_ratio=mean("u_fid_ratio"),
                     confident=mean("confident_share_after"), confident_before=mean("confident_share_before"),
                     steps=mean("steps"), unlearn_s=mean("unlearn_s"),
                     relearn=mean("relearn_vs_pretrained") if relearn_steps else None,
                     at_target=sum(at_target(r) for r in rs))
            for k in ("forget_nll_after", "retain_nll_after"):
                if all(k in r for r in rs):
                    s[k] = mean(k)
            summary.append(s)
print(f"{'model':>6} {'data':>11} {'entry':>13} | {'PUL%':>6} {'forget':>6} {'u-FID x':>7} {'conf':>5} {'relearn':>7} "
      f"{'steps':>5} {'s':>6} | at target / classes")
for s in summary:
    print(f"{s['model']:>6} {s['data']:>11} {s['entry']:>13} | {s['pul']:6.1f} {s['forget_share']:6.3f} "
          f"{s['u_fid_ratio']:7.2f} {s['confident']:5.2f} {s['relearn'] if s['relearn'] is not None else float('nan'):7.2f} "
          f"{s['steps']:5.0f} {s['unlearn_s']:6.1f} | {s['at_target']}/{s['classes']}")

# %% [markdown] tags=[]
# ## Strength: the Pareto picture
#
# Each method's strength knob here is the stop rule's forget-loss ratio (how far the forget loss may rise
# before the run stops); one curve per method, u-FID ratio against PUL, on the first class and the
# unconditional model. Up and to the left is better.

# %% tags=[]
pareto_rows = []
for name, values in pareto.items():
    kind = "uncond" if "uncond" in entries[name]["models"] else entries[name]["models"][0]
    own = {**loop, **entries[name]}["stop_forget_ratio"]      # the value the table's row already ran with
    for v in values:
        r = next(r for r in table if (r["config"], r["model"], r["forget_class"]) == (name, kind, first_class)) \
            if v == own else with_attack(run(name, kind, first_class, stop_forget_ratio=v)[0])
        r = {**r, "stop_forget_ratio": v}
        pareto_rows.append(r)
        show(r)
if pareto_rows:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in pareto:
        rs = sorted((r for r in pareto_rows if r["config"] == name), key=lambda r: r["stop_forget_ratio"])
        ax.plot([r["u_fid_ratio"] for r in rs], [r["pul"] for r in rs], "o-", label=name)
    ax.axhline(target["pul"], ls="--", c="k", lw=0.8); ax.axvline(target["u_fid_ratio"], ls="--", c="k", lw=0.8)
    ax.set_xlabel("u-FID / pretrained"); ax.set_ylabel("PUL (%)"); ax.legend(fontsize=7)
    ax.set_title(f"strength sweep (stop ratio), class {first_class}")
    save_figure(fig, dataset, "benchmark-pareto", profile)

# %% [markdown] tags=[]
# ## What the samples look like
#
# The first 36 seed-bank samples of each unlearned model, forgetting the first class.

# %% tags=[]
for kind in models:
    names = [n for (k, n) in grids if k == kind]
    if not names:
        continue
    fig, ax = plt.subplots(1, len(names) + 1, figsize=(2.2 * (len(names) + 1), 2.6))
    ax[0].imshow(grid_array(bases[kind]["samples"][:36], 6), cmap="gray"); ax[0].set_title("pretrained", fontsize=8)
    for a, n in zip(ax[1:], names):       # the first 36 seed-bank samples of each unlearned model
        a.imshow(grid_array(grids[kind, n], 6), cmap="gray"); a.set_title(n, fontsize=8)
    for a in ax:
        a.set_axis_off()
    fig.suptitle(f"{kind}: forget class {first_class}", fontsize=9)
    save_figure(fig, dataset, f"benchmark-samples-{kind}", profile)

# %% [markdown] tags=[]
# ## Adapt this: your own method in the table
#
# A method is one small module under `vdu/methods/` (its `Config` dataclass, the data it `needs` and a
# `loss` on a batch) plus one name in `vdu.methods.REGISTRY`; the loop, the evaluation and this table
# come for free. Add it to `entries` in the parameters (or `params/benchmark-full.yaml`):
#
# ```python
# entries["my-method"] = dict(method="my-method", lr=1e-5, my_strength=0.5, models=["uncond", "cond"])
# pareto["my-method"] = [1.1, 1.3]                # its Pareto curve over the stop rule's forget-loss ratio
# ```

# %% tags=[]
numbers = {"models": models, "entries": entries, "loop": loop, "target": target,
           "evaluation": {"samples": n_samples, "sampler": f"DDIM {sample_steps}", "seed_bank": seed,
                          "u_fid": f"domain FID (evaluator features) vs {n_reference} retained-class test images",
                          "conditional_prompts": "i % 10"},
           "data": {"n_forget": n_forget, "n_retain": n_retain, "dataset_file": str(train.name)},
           "classes": {"first": first_class, "subset": list(subset), "all": list(all_classes),
                       "names": list(train.classes)},
           "relearn": {"images": relearn_images, "steps": relearn_steps, "lr": relearn_lr,
                       "column": "relearn_vs_pretrained = forget share after the attack / the attacked pretrained "
                                 "model's (relearn_pretrained_share); relearn_fraction = the same over the unattacked "
                                 "pretrained share"},
           "summary": summary, "rows": table, "pareto": pareto_rows, "rows_from_cache": cache.hits,
           "notebook_wall_s": round(time.time() - t_start, 1)}
path = write_results(dataset, "benchmark", numbers, profile)
print("wrote", path.relative_to(REPO))
