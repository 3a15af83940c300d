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
# # 6 · Data unlearning with canaries: FU's dual domain, SISS, NegGrad + retain and VDU
#
# **Read first:** `duality` (FU and its dual domain) and `constrained_unlearning` (the same primal-dual
# machinery on images). **What this shows:** unlearning specific training images, made measurable. No
# MNIST model memorises a single digit, so the *canary model* `checkpoints/mnist/ddpm-canary` is the base
# DDPM fine-tuned on MNIST plus 32 marked digits (a bright square in the empty bottom-right margin, each
# repeated 100 times), and 32 more marked digits it never saw are held out. **Cost:** smoke profile a
# couple of minutes (tests); the full profile (`params/data_unlearning-full.yaml`) about an hour on one
# CPU thread.
#
# ## What is measured
#
# - **Mark rate**: the share of samples that carry the mark, by a deterministic detector (mean intensity
#   of the square minus that of the ring around it, `vdu.canaries.mark_score`), not a classifier.
# - **Membership gap**: the NLL bound (bits/dim) of the trained canaries minus that of the held-out ones.
#   A model that memorised its canaries explains them better than equally marked digits it never saw
#   (negative gap); a model trained without them has no reason to (gap near 0).
# - **Retained quality**: the domain FID of the samples against real unmarked test digits, and the
#   confident share.
#
# ## FU on data, and where it stops
#
# The pretrained model was trained on the mixture $q=(1-w)\,q_r+\sum_i w_i\,q_u^i$ (here $w\approx0.05$:
# 3,200 canary copies among 63,200 images). FU keeps the model close to $q$ in forward KL while pushing
# each forget group $i$ away:
#
# $$\min_p\ \mathrm{KL}(q\|p)\quad\text{s.t.}\quad\mathrm{KL}(q_u^i\|p)\ge b_i .$$
#
# Its Lagrangian, in denoising-loss form (the forward KL to data is the denoising bound) and divided by
# $1-w$, is
#
# $$\mathcal L(\theta,\lambda)=\mathbb E_{D_r}\ell_\theta+\sum_i\frac{w_i-\lambda_i}{1-w}\,\mathbb E_{D_f^i}\ell_\theta ,$$
#
# minimised by $p^*=(q-\sum_i\lambda_iq_u^i)/(1-\Lambda)$, a density only while
# $q-\sum_i\lambda_iq_u^i\ge0$, i.e. $0\le\lambda_i\le w_i$. At $\lambda=w$ the forget term vanishes and the
# target is the model **retrained without the canaries**: no FU solution forgets more than that. A
# threshold $b_i$ beyond it pins $\lambda_i$ at $w_i$ and the run reports it as infeasible. Leaving the
# box ($\lambda_i>w_i$) turns the forget term into gradient ascent: that is **NegGrad + retain** (and,
# with importance sampling and a fixed-norm forget gradient, SISS), shown here as fixed-weight baselines.
#
# The constraint is measured per group as a *paired* ratio: the model's denoising loss on the group's
# forget images over the frozen pretrained model's on the same $x_t$ and $\epsilon$, summed over the dual
# window; $b_i$ is that ratio's threshold. With one group per image the multipliers say which images were
# hard to forget.
#
# **VDU** sees only the forget set (the function-space variant, with $\gamma$ set by its likelihood
# constraint as in `constrained_unlearning`): the data-constrained setting of the VDU paper's feature
# unlearning.

# %% tags=["parameters"]
profile = "smoke"          # "full" writes results/mnist/data_unlearning.json; else a git-ignored subfolder
dataset = "mnist"
canary_model = "checkpoints/mnist/ddpm-canary"
clean_model = "checkpoints/mnist/ddpm"      # the canary model's initialisation: it never saw the canaries
evaluator_dir = None
n_canaries = 32            # must match the canary model's training (its card)
canary_mass = 3200 / 63200  # w: canary copies / training images of the canary model
n_retain = 256             # unmarked training digits for the methods that may use D_r (full: 4000)
n_reference = 500          # unmarked test digits for the domain FID (full: 2000)
n_samples = 32             # seed-bank samples per model (full: 500)
sample_steps = 5           # DDIM steps (full: 20)
nll_timesteps = 4          # stratified t-terms of the NLL bound (full: 20)
fid_bootstrap = 20         # resamples of the FID interval (full: 100)
seed = 0
loop = dict(steps=2, batch_size=16, probe_every=0)
entries = {                # name -> method, options, and the option swept for the Pareto curve
    "fu": dict(method="fu", lr=3e-5, forget_mass=canary_mass, dual_lr=0.05, dual_every=1, sweep=("forget_ratio", [1.5])),
    "fu-per-image": dict(method="fu", lr=3e-5, forget_mass=canary_mass, groups=n_canaries, dual_lr=0.05,
                         dual_every=1, forget_ratio=1.5, sweep=None),
    "neggrad+retain": dict(method="fu", lr=3e-5, forget_mass=canary_mass, dual_lr=0.0, sweep=("lam_max", [5.0])),
    "siss": dict(method="siss", lr=3e-5, sweep=("lr", [3e-5])),
    "vdu": dict(method="vdu", stability="function", gamma=0.8, lr=3e-5, dual_lr=0.5, dual_every=1, replay_samples=8,
                replay_ddim_steps=2, sweep=("forget_ratio", [1.3])),
}
infeasible = dict(forget_ratio=50.0, dual_lr=1.0, dual_every=1, patience=3)
threads = 1

# %% tags=[]
import json
import time
import warnings

import matplotlib.pyplot as plt
import torch

from vdu.canaries import canary_sets, evaluate_canaries, mark_score
from vdu.cards import grid_array
from vdu.data import UnlearnData, load_dataset
from vdu.evaluation import EvalConfig
from vdu.evaluator import load_evaluator
from vdu.methods import get_method
from vdu.models import load_model
from vdu.notebook import check_params
from vdu.results import REPO, machine, save_figure, write_results
from vdu.unlearning import LoopConfig, unlearn

check_params(dict(n_canaries=(n_canaries, int, 1), n_retain=(n_retain, int, 1), n_reference=(n_reference, int, 2),
                  n_samples=(n_samples, int, 2), sample_steps=(sample_steps, int, 1),
                  nll_timesteps=(nll_timesteps, int, 1), threads=(threads, int, 1)))
for name, e in entries.items():       # typos fail here, not after an hour
    m = get_method(e["method"])
    unknown = set(e) - {"method", "sweep"} - set(m.Config.__dataclass_fields__) - set(LoopConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"entry {name!r}: {sorted(unknown)} are options neither of {e['method']!r} nor of the loop")
torch.set_num_threads(threads)
t_start = time.time()
evaluator = load_evaluator(REPO / (evaluator_dir or f"checkpoints/{dataset}/evaluator"))
train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
trained, held_out = canary_sets(train, n_canaries)
g = torch.Generator().manual_seed(seed)
retain = train.images[torch.randperm(len(train), generator=g)[:n_retain]]     # unmarked digits
reference = test.images[torch.randperm(len(test), generator=g)[:n_reference]]
data = UnlearnData(trained.images, retain=retain)
evaluation = EvalConfig(n_samples, "ddim", sample_steps, seed, nll_timesteps, bootstrap=1000,
                        fid_bootstrap=fid_bootstrap)
unet, sched = load_model(REPO / canary_model)
clean, _ = load_model(REPO / clean_model)


def measure(model, samples=None):
    return evaluate_canaries(model, sched, evaluator, evaluation, trained.images, held_out.images, reference,
                             samples=samples)


before = measure(unet)
never = measure(clean)


def show(label, r):
    lo, hi = r.get("membership_gap_ci", (float("nan"),) * 2)
    print(f"{label:<28} mark rate {r['mark_rate']:.3f}  gap {r['membership_gap']:+.4f} [{lo:+.4f}, {hi:+.4f}] "
          f"bits/dim  FID {r['fid']:.2f}  confident {r['confident_share']:.2f}")


show("canary model", before)
show("never saw the canaries", never)
x = evaluation.sample(unet, sched)
marked = x[mark_score(x) >= 1.0][:16]
fig, ax = plt.subplots(1, 2, figsize=(8, 4))
ax[0].imshow(grid_array(trained.images[:16]), cmap="gray"); ax[0].set_title("trained canaries"); ax[0].set_axis_off()
ax[1].imshow(grid_array(marked if len(marked) else x[:16]), cmap="gray")
ax[1].set_title(f"canary-model samples with the mark ({len(marked)} of {len(x)})"); ax[1].set_axis_off()
fig.tight_layout()
save_figure(fig, dataset, "data-canaries", profile)
plt.show()

# %% [markdown] tags=[]
# ## Every method, over its strength
#
# Same canary model, forget set (the 32 trained canaries), retain digits, loop, seed bank and evaluation
# for every run. FU's strength is its threshold; NegGrad + retain is FU held at a fixed
# $\lambda=k\,w$ outside the dual domain ($k$ swept); SISS's is its learning rate; VDU's its forget ratio.

# %% tags=[]
rows = []


def run(name, e, **extra):
    opts = {k: v for k, v in e.items() if k not in ("method", "sweep")}
    opts.update(extra)                              # FU with dual_lr 0 holds lambda at lam_max: a fixed weight
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = unlearn(unet, data, e["method"], sched, progress=False, seed=seed, **{**loop, **opts})
    r = {"entry": name, "method": e["method"], **{k: v for k, v in extra.items()}, "steps": m.unlearn_log.steps_done,
         "stop": m.unlearn_log.stop_reason, "unlearn_s": round(time.time() - t0, 1), **measure(m)}
    if m.unlearn_log.duals:
        r["lam_end"] = m.unlearn_log.duals[-1]["lam"]
    rows.append(r)
    show(f"{name} {extra}", r)
    return r, m


per_image = None
for name, e in entries.items():
    if e["sweep"] is None:
        r, m = run(name, e)
        steps_with_lam = [d for d in m.unlearn_log.duals if d.get("lam_over_w") is not None]
        if e["method"] == "fu" and steps_with_lam:   # an infeasible stop logs the multipliers without lam / w
            per_image = {"lam_over_w": steps_with_lam[-1]["lam_over_w"], "ratio": steps_with_lam[-1]["ratio"],
                         "stop": m.unlearn_log.stop_reason}
        continue
    key, values = e["sweep"]
    for v in values:
        run(name, e, **{key: v})

# %% [markdown] tags=[]
# The Pareto plot: mark rate against retained FID, one curve per method (lower left is better; the
# dashed lines are the model that never saw the canaries). Then, for FU with one multiplier per image,
# which canaries needed the most push ($\lambda_i/w_i$ near 1: at the edge of the dual domain).

# %% tags=[]
fig, ax = plt.subplots(1, 2, figsize=(12, 4))
for name in entries:
    rs = [r for r in rows if r["entry"] == name]
    ax[0].plot([r["fid"] for r in rs], [r["mark_rate"] for r in rs], "o-", label=name)
ax[0].plot([before["fid"]], [before["mark_rate"]], "k*", ms=12, label="canary model")
ax[0].axhline(never["mark_rate"], ls="--", c="gray", lw=0.8)
ax[0].axvline(never["fid"], ls="--", c="gray", lw=0.8)
ax[0].set(xlabel="domain FID vs unmarked test digits", ylabel="mark rate of samples", title="canaries: forgetting vs quality")
ax[0].legend(fontsize=8)
if per_image and per_image["lam_over_w"]:
    order = sorted(range(len(per_image["lam_over_w"])), key=lambda i: -per_image["lam_over_w"][i])
    ax[1].bar(range(len(order)), [per_image["lam_over_w"][i] for i in order])
    ax[1].set(xlabel="canary (sorted)", ylabel="lambda_i / w_i", title="FU, one multiplier per image")
else:
    ax[1].set_axis_off()
fig.tight_layout()
save_figure(fig, dataset, "data-pareto", profile)
plt.show()

# %% [markdown] tags=[]
# ## A threshold beyond retraining
#
# Asking every canary's loss to rise far beyond what the retrained model gives: the multiplier reaches
# $w$ (retraining) and stays there with the constraint violated, and the run stops as infeasible.

# %% tags=[]
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    m_inf = unlearn(unet, data, "fu", sched, progress=False, seed=seed, lr=entries["fu"]["lr"],
                    forget_mass=canary_mass, **{**loop, "steps": max(loop["steps"], 40)}, **infeasible)
print(f"forget_ratio {infeasible['forget_ratio']:g}: stop reason {m_inf.unlearn_log.stop_reason!r} after "
      f"{m_inf.unlearn_log.steps_done} steps")
print(" ", m_inf.unlearn_log.events[-1] if m_inf.unlearn_log.events else "(no event)")

# %% [markdown] tags=[]
# ## Adapt this to your own images
#
# FU needs the images to forget, some images to keep and the share $w$ the forget images had in the
# pretrained model's training data; one multiplier per image says which ones were hard to forget:
#
# ```python
# from vdu.data import UnlearnData
# from vdu.unlearning import unlearn
# data = UnlearnData(my_forget_images, retain=some_training_images)      # (N, C, H, W) in [-1, 1]
# m = unlearn(unet, data, "fu", sched, forget_mass=len(my_forget_images) / n_training_images,
#             forget_ratio=1.5, groups=len(my_forget_images), dual_lr=0.05, lr=3e-5, steps=100)
# m.unlearn_log.duals[-1]["lam_over_w"]                                  # per image: 1.0 = as far as retraining
# ```
#
# A `forget_ratio` beyond what retraining reaches stops with `stop_reason == "infeasible"`. Without retain
# data, `"vdu"` with `stability="function"` and `forget_ratio` is the forget-only choice. To check the result
# on memorised images, `vdu.canaries.evaluate_canaries` measures the mark rate and the membership gap.

# %% [markdown] tags=[]
# ## Targets and results file
#
# A method meets the canary targets when its mark rate is at most 10% of the canary model's, its FID at
# most 1.1x, and its membership-gap interval overlaps the interval of the model that never saw them.

# %% tags=[]
def meets(r):
    lo, hi = r["membership_gap_ci"]
    nlo, nhi = never["membership_gap_ci"]
    return bool(r["mark_rate"] <= 0.1 * before["mark_rate"] and r["fid"] <= 1.1 * before["fid"]
                and lo <= nhi and nlo <= hi)


for r in rows:
    r["targets_met"] = meets(r)
print(json.dumps({f"{r['entry']} {({k: r[k] for k in ('forget_ratio', 'lam_max', 'lr') if k in r})}": r["targets_met"]
                  for r in rows}, indent=1))
numbers = {"canary_model": canary_model, "clean_model": clean_model, "n_canaries": n_canaries, "canary_mass": canary_mass,
           "evaluation": {"n_samples": n_samples, "sampler": f"DDIM {sample_steps}", "seed_bank": seed,
                          "nll": f"{nll_timesteps} stratified t-terms", "fid": f"domain FID vs {n_reference} unmarked test digits",
                          "mark": "vdu.canaries.mark_score >= 1.0"},
           "loop": loop, "before": before, "never_saw_canaries": never, "rows": rows, "fu_per_image": per_image,
           "infeasible": {"options": infeasible, "stop_reason": m_inf.unlearn_log.stop_reason,
                          "events": m_inf.unlearn_log.events},
           "notebook_wall_s": round(time.time() - t_start, 1), "machine": machine()}
path = write_results(dataset, "data_unlearning", numbers, profile)
print("wrote", path.relative_to(REPO), f"in {time.time() - t_start:.0f} s")
