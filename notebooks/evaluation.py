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
# # 7 · How sure a number is: intervals, seed banks, a second evaluator and the sampler
#
# **Read first:** `vdu_unlearning` (PUL, u-FID and the function-space VDU run re-measured here).
# **What this shows:** how much a class-unlearning number moves when only the *measurement* changes —
# other noise (seed banks), another classifier, another sampler or step count — and how many samples a
# claim needs. **Cost:** smoke profile under a minute (tests); the full profile
# (`params/evaluation-full.yaml`) about 45 minutes on one CPU thread.
#
# ## Why PUL is noisy
#
# PUL compares the forget-class counts of the original and the unlearned model on the same seed bank of
# $n$ samples (docs/mathematics.md §4):
#
# $$\mathrm{PUL}=\frac{N_0-N_1}{N_0}\times100,\qquad N_0=\#\{i: \hat y(x_i^{\text{orig}})=c\},\quad
# N_1=\#\{i: \hat y(x_i^{\text{unl}})=c\}.$$
#
# Its denominator is small: with the forgotten class at a share $s$ of the original samples,
# $N_0\approx sn$ — about 26 of 256 samples for $s=0.1$. If each of the $N_0$ forget-class seeds still
# yields the class after unlearning with probability $r=1-\mathrm{PUL}/100$ (and no other seed turns into
# it), $N_1\mid N_0\sim\mathrm{Bin}(N_0,r)$ and
#
# $$\operatorname{sd}(\mathrm{PUL})\approx100\sqrt{\frac{r(1-r)}{N_0}}\approx100\sqrt{\frac{r(1-r)}{s\,n}} .$$
#
# At $\mathrm{PUL}=95\%$, $s=0.1$, $n=256$ that is $\pm4.3$ points per standard deviation, so the 95%
# interval spans about 17 points: a single bank of 256 samples cannot tell 90% from 97%. On top of this
# $N_0$ itself changes from bank to bank ($\operatorname{sd}(N_0)=\sqrt{ns(1-s)}$, ±19% of $N_0$ here).
#
# ## What `vdu` reports
#
# - **Paired bootstrap** for PUL: resample the $n$ seed indices with replacement, *the same indices for
#   both models* (the pairs share their noise), recompute $(N_0^*-N_1^*)/N_0^*$; the 2.5% and 97.5%
#   percentiles of 1,000 resamples form the interval. Shares and u-FID are resampled the same way (u-FID
#   against a fixed reference set).
# - **Seed banks**: independent noise for both models; pooling $B$ banks is one bank of $Bn$ samples.
# - **A second evaluator** (`checkpoints/<dataset>/evaluator-lenet`: another architecture and seed, no
#   outlier exposure) labels the same samples: its PUL and the share of labels the two agree on.
# - **The sample count a target needs** (`vdu.evaluation.samples_needed`): the smallest $n$ whose Wilson
#   interval for the surviving fraction $r$ of the $sn$ forget-class samples excludes the other value.

# %% tags=["parameters"]
profile = "smoke"          # "full" writes results/mnist/evaluation.json; else a git-ignored subfolder
dataset = "mnist"
model_dir = "checkpoints/mnist/ddpm"
evaluator_dir = None       # default checkpoints/<dataset>/evaluator
second_dir = None          # default checkpoints/<dataset>/evaluator-lenet
forget_class = 1
n_forget = 64              # forget-class training images the method sees (full: 1000)
method = "vdu"             # the unlearned model re-measured here: function-space VDU, as in vdu_unlearning
options = dict(stability="function", gamma=0.8, lr=3e-5, steps=2, stop_forget_ratio=1.3, replay_samples=8,
               replay_ddim_steps=2, batch_size=16, normalization="mean", center="deployed", weighting="simple",
               probe_every=2)
n_samples = 32             # samples per seed bank and per model (full: 500)
banks = [0, 1]             # seed banks at the table setting (full: [0, 1, 2, 3])
table_sampler = ["ddim", 5]  # the setting the tables use (full: ddim, 20)
settings = [["ddim", 3], ["ddim", 5], ["dpm", 5]]   # sampler sensitivity on bank 0 (full: DDIM 10/20/50/100, DPM 10/20)
n_reference = 200          # retained-class test images for u-FID (full: 2000)
bootstrap = 200            # resamples of every interval (full: 1000)
fid_bootstrap = 0          # resamples of the u-FID interval (full: 50)
seed = 0
threads = 1

# %% tags=[]
import time
import warnings

import matplotlib.pyplot as plt
import torch

from vdu.data import class_split, load_dataset
from vdu.evaluation import EvalConfig, compare, numbers_only, pooled_pul, samples_needed
from vdu.evaluator import load_evaluator
from vdu.models import load_model
from vdu.notebook import check_params
from vdu.results import REPO, save_figure, write_results
from vdu.unlearning import unlearn

check_params(dict(n_forget=(n_forget, int, 1), n_samples=(n_samples, int, 2), n_reference=(n_reference, int, 2),
                  bootstrap=(bootstrap, int, 1), fid_bootstrap=(fid_bootstrap, int, 0), threads=(threads, int, 1)))
if not banks or not settings:
    raise ValueError("banks and settings must each name at least one entry")
torch.set_num_threads(threads)
t_start = time.time()
evaluator = load_evaluator(REPO / (evaluator_dir or f"checkpoints/{dataset}/evaluator"))
second = load_evaluator(REPO / (second_dir or f"checkpoints/{dataset}/evaluator-lenet"))
train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
split = class_split(train, test, forget_class, n_forget, n_reference=n_reference, nll_images=0, seed=seed)
unet, sched = load_model(REPO / model_dir)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    unl = unlearn(unet, split, method, sched, progress=False, seed=seed, **options)
log = unl.unlearn_log
print(f"unlearned class {forget_class}: {log.steps_done} steps, stop: {log.stop_reason}, "
      f"{time.time() - t_start:.0f} s")


def config(sampler, steps, bank):
    return EvalConfig(n_samples, sampler, steps, bank, nll_timesteps=0, bootstrap=bootstrap, fid_bootstrap=fid_bootstrap)


# %% [markdown] tags=[]
# ## The interval, once by hand
#
# The paired bootstrap is four lines on the two label vectors; `vdu.evaluation.measure` does the same
# (with its own resampling seed, so the two intervals agree up to resampling noise).

# %% tags=[]
rows_banks = compare(unet, unl, sched, evaluator, split, [config(*table_sampler, b) for b in banks], second=second)
first = rows_banks[0]
l0, l1 = first["before"]["labels"] == forget_class, first["after"]["labels"] == forget_class
idx = torch.randint(0, n_samples, (bootstrap, n_samples), generator=torch.Generator().manual_seed(seed))
n0, n1 = l0.float()[idx].sum(1), l1.float()[idx].sum(1)
if l0.any():
    by_hand = torch.quantile(((n0 - n1) / n0.clamp_min(1) * 100)[n0 > 0], torch.tensor([0.025, 0.975])).tolist()
    print(f"bank {banks[0]}: N0 = {int(l0.sum())}, N1 = {int(l1.sum())}, PUL {first['after']['pul']:.1f}%; "
          f"interval by hand [{by_hand[0]:.1f}, {by_hand[1]:.1f}], by vdu {first['after']['pul_ci']}")
else:
    by_hand = None
    print(f"bank {banks[0]} holds no sample of class {forget_class}: PUL is undefined there (more samples needed)")

# %% [markdown] tags=[]
# ## Seed banks and the second evaluator
#
# The same two models, other noise: each bank is a fresh draw of $n$ seeds for both. The second
# evaluator labels the same samples.

# %% tags=[]
def fmt(v, ci, f="{:.1f}"):
    return f"{f.format(v)} [{f.format(ci[0])}, {f.format(ci[1])}]" if ci else f.format(v)


print(f"{'bank':>4} {'N0':>4} {'N1':>4} {'PUL % [95% CI]':>22} {'PUL 2nd evaluator':>22} {'agreement':>9}")
for r in rows_banks:
    b, a = r["before"], r["after"]
    print(f"{r['seed_bank']:>4} {int((b['labels'] == forget_class).sum()):>4} {int((a['labels'] == forget_class).sum()):>4} "
          f"{fmt(a['pul'], a.get('pul_ci')):>22} {fmt(a['pul_second'], a.get('pul_second_ci')):>22} "
          f"{b['label_agreement']:>9.3f}")
pooled = pooled_pul(rows_banks, forget_class, bootstrap=bootstrap, seed=seed)
pooled_second = pooled_pul(rows_banks, forget_class, "_second", bootstrap=bootstrap, seed=seed)
print(f"pooled over {len(banks)} banks ({pooled['n_samples']} samples, N0 = {pooled['forget_before']}): "
      f"PUL {fmt(pooled['pul'], pooled['pul_ci'])}; second evaluator {fmt(pooled_second['pul'], pooled_second['pul_ci'])}")

fig, ax = plt.subplots(figsize=(6, 3.2))
for k, (suffix, name) in enumerate((("", "evaluator"), ("_second", "second evaluator"))):
    xs = [i + 0.15 * k for i in range(len(banks))] + [len(banks) + 0.15 * k]
    vals = [r["after"][f"pul{suffix}"] for r in rows_banks] + [(pooled, pooled_second)[k]["pul"]]
    cis = [r["after"].get(f"pul{suffix}_ci") or [v, v] for r, v in zip(rows_banks, vals)] + [(pooled, pooled_second)[k]["pul_ci"]]
    err = [[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]]
    ax.errorbar(xs, vals, yerr=err, fmt="o", capsize=3, label=name)
ax.set_xticks(range(len(banks) + 1), [f"bank {b}" for b in banks] + ["pooled"])
ax.axhline(95, color="gray", ls=":", lw=1)
ax.set_ylabel("PUL % (95% CI)")
ax.set_title(f"class {forget_class}: {n_samples} samples per bank, {table_sampler[0]} {table_sampler[1]}")
ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, dataset, "evaluation-seed-banks", profile)
plt.show()

# %% [markdown] tags=[]
# ## Sampler and step count
#
# Bank 0 again, under every sampler setting: does the cheaper setting the tables use change the
# conclusion? PUL, the forget share before and the u-FID ratio (after / before) per setting.

# %% tags=[]
rows_sampler = compare(unet, unl, sched, evaluator, split, [config(m, s, banks[0]) for m, s in settings], second=second)
print(f"{'sampler':>10} {'forget share before':>20} {'PUL % [95% CI]':>22} {'PUL 2nd':>7} {'u-FID before':>13} "
      f"{'after':>7} {'ratio':>6}")
for r in rows_sampler:
    b, a = r["before"], r["after"]
    r["u_fid_ratio"] = a["u_fid"] / b["u_fid"]
    print(f"{r['sampler'] + ' ' + str(r['steps']):>10} {b['forget_share']:>20.3f} {fmt(a['pul'], a.get('pul_ci')):>22} "
          f"{a['pul_second']:>7.1f} {b['u_fid']:>13.2f} {a['u_fid']:>7.2f} {r['u_fid_ratio']:>6.2f}")

fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
for m in sorted({r["sampler"] for r in rows_sampler}):
    rs = sorted((r for r in rows_sampler if r["sampler"] == m), key=lambda r: r["steps"])
    st = [r["steps"] for r in rs]
    pv = [r["after"]["pul"] for r in rs]
    ci = [r["after"].get("pul_ci") or [v, v] for r, v in zip(rs, pv)]
    ax[0].errorbar(st, pv, yerr=[[v - c[0] for v, c in zip(pv, ci)], [c[1] - v for v, c in zip(pv, ci)]],
                   fmt="o-", capsize=3, label=m)
    ax[1].plot(st, [r["u_fid_ratio"] for r in rs], "o-", label=m)
for a_, lab in zip(ax, ("PUL % (95% CI)", "u-FID after / before")):
    a_.set_xscale("log"); a_.set_xlabel("sampler steps"); a_.set_ylabel(lab); a_.legend(fontsize=8)
fig.suptitle(f"class {forget_class}, bank {banks[0]}, {n_samples} samples per setting", fontsize=10)
fig.tight_layout()
save_figure(fig, dataset, "evaluation-sampler", profile)
plt.show()

# %% [markdown] tags=[]
# ## How many samples a claim needs
#
# With the forget share the original model showed at the table setting, the samples per model (and the
# seed banks of $n$) needed for a measured PUL to exclude a neighbouring value:

# %% tags=[]
share = pooled["forget_before"] / pooled["n_samples"]
budget = []
for p, other in ((99.0, 95.0), (95.0, 90.0), (90.0, 80.0)):
    need = samples_needed(share, p, other)
    budget.append({"pul": p, "other": other, "samples": need, "banks": -(-need // n_samples)})
    print(f"PUL {p:.0f}% vs {other:.0f}% at forget share {share:.3f}: {need} samples ({-(-need // n_samples)} banks of {n_samples})")

# %% [markdown] tags=[]
# ## Adapt this to your own model
#
# Any pair of models (the pretrained one and its unlearned copy) on the same schedule:
#
# ```python
# from vdu.evaluation import EvalConfig, compare, pooled_pul
# rows = compare(pretrained, unlearned, sched, evaluator, class_split(train, test, k, n_reference=2000),
#                [EvalConfig(500, "ddim", 20, bank) for bank in range(4)], second=second_evaluator)
# pooled_pul(rows, k)                                             # PUL over 2,000 samples, with its interval
# ```
#
# or on the command line `python -m vdu evaluate <model> --forget-class k --n-samples 2000
# --second-evaluator checkpoints/<dataset>/evaluator-lenet`. For another dataset, train both evaluators
# first: `python -m vdu evaluator --dataset <name> --out ...` and the same with `--arch lenet --seed 1
# --oe-weight 0`.

# %% tags=[]
wall = time.time() - t_start
results = {
    "model": model_dir, "forget_class": forget_class, "method": method, "options": options, "n_forget": n_forget,
    "unlearn": {"steps": log.steps_done, "stop": log.stop_reason},
    "evaluator": evaluator_dir or f"checkpoints/{dataset}/evaluator",
    "second_evaluator": second_dir or f"checkpoints/{dataset}/evaluator-lenet",
    "n_samples": n_samples, "table_sampler": table_sampler, "bootstrap": bootstrap,
    "seed_banks": [{k: (numbers_only(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows_banks],
    "pooled": pooled, "pooled_second": pooled_second,
    "sampler": [{k: (numbers_only(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows_sampler],
    "budget": budget, "wall_time_s": round(wall, 1),
}
path = write_results(dataset, "evaluation", results, profile)
print(f"wrote {path.relative_to(REPO)} ({wall / 60:.1f} min)")

# %% [markdown] tags=[]
# ## Checks

# %% tags=[]
assert pooled["forget_before"] == sum(int((r["before"]["labels"] == forget_class).sum()) for r in rows_banks), \
    "pooled N0 is not the sum over the banks"
assert all(0 <= r["before"]["label_agreement"] <= 1 for r in rows_banks)
if by_hand is not None and first["after"].get("pul_ci"):   # two resamplings of the same pairs: close, not equal
    width = first["after"]["pul_ci"][1] - first["after"]["pul_ci"][0]
    assert all(abs(h - v) <= width / 3 + 1e-9 for h, v in zip(by_hand, first["after"]["pul_ci"])), \
        (by_hand, first["after"]["pul_ci"])
print("checks passed: pooled counts, agreement range, hand and library intervals")
