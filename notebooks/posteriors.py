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
# # 8 · Where VDU's posterior comes from
#
# **Read first:** `vdu_unlearning` (the stability regularizer $B$ and why the paper's VDU did not unlearn a
# class here). **What this shows:** four ways to estimate the Gaussian weight posterior that $B$ needs, how
# different their $\sigma^*$ are, and whether the choice changes what VDU does — under AdamW (the setting of
# every table) and under plain gradient steps preconditioned by $\sigma^{*2}$, where the posterior's
# shape enters the update directly. **Cost:** smoke profile about a minute (tests); the full profile
# (`params/posteriors-full.yaml`) about 40 minutes on one CPU thread.
#
# ## The term and what the posterior decides
#
# VDU's stability regularizer pulls the weights towards the pretrained posterior
# $\mathcal N(\mu^*, \operatorname{diag}\sigma^{*2})$ (docs/mathematics.md §1):
#
# $$B(\theta)=\frac1P\sum_{i=1}^P\frac{(\theta_i-\mu^*_i)^2}{2\sigma^{*2}_i},\qquad
# \frac{\partial B}{\partial\theta_i}=\frac{\theta_i-\mu^*_i}{P\,\sigma^{*2}_i}.$$
#
# A weight with a wide posterior (large $\sigma^*_i$) is free to move; a narrow one is held. The *absolute*
# scale of $\sigma^*$ trades off against $\gamma$; its *shape* — which weights are free — is what a
# posterior contributes. Two facts decide whether that shape reaches the weights:
#
# - **AdamW** divides each parameter's step by a running root-mean-square of its own gradient. Once
#   $\gamma B$ dominates $(1-\gamma)A$ for a parameter, its step is $\approx \mathrm{lr}\cdot
#   \operatorname{sign}(\theta_i-\mu^*_i)$ whatever $\sigma^*_i$ is: the shape is normalised away.
# - **Plain gradient steps** move $\theta_i$ by $\mathrm{lr}\cdot\partial L/\partial\theta_i$, so
#   $\sigma^*_i$ scales the pull directly. With `precondition=True` the step is also multiplied by
#   $\sigma^{*2}_i/\overline{\sigma^{*2}}$ (a natural-gradient step under the posterior's metric): the
#   forget gradient then moves wide weights more, and $B$'s pull becomes uniform,
#   $(\theta_i-\mu^*_i)/(P\,\overline{\sigma^{*2}})$.
#
# ## Four posteriors
#
# 1. **Late snapshots** (SWAG-diagonal): the mean and variance of the last $K$ raw weights of the
#    pretraining run. Cheap, but the iterates of one run late in training barely move, so $\sigma^*$ is
#    tiny and nearly uniform.
# 2. **Independent continuations** (the paper's "several checkpoints"): $K$ runs from $\theta^*$ with
#    different seeds and data orders; their spread is what another training run could have produced.
# 3. **Forget-set Fisher** (Laplace): precision $N F_i + 1$ with
#    $F_i=\mathbb E\big[(\partial L_\text{simple}/\partial\theta_i)^2\big]$ on the forget set and a unit
#    prior precision: narrow exactly where the forget data pins a weight — the weights unlearning must move.
# 4. **The model alone**: continuations on the model's own samples, for a user who has one diffusers
#    folder and no training data or checkpoints.

# %% tags=["parameters"]
profile = "smoke"          # "full" writes results/mnist/posteriors.json; else a git-ignored subfolder
dataset = "mnist"
model_dir = "checkpoints/mnist/ddpm"   # needs posterior.safetensors (the snapshot posterior) beside it
evaluator_dir = None       # default checkpoints/<dataset>/evaluator
forget_class = 1
n_forget = 64              # forget-class training images (full: 1000)
posteriors = ["snapshots", "continuations", "fisher", "self"]
k = 2                      # checkpoints of the continuation posteriors (full: 3)
continuation_steps = 2     # steps of each continuation on the training data (full: 300)
self_samples = 64          # the model's own samples for "self", at least one batch of 64 (full: 512)
self_steps = 2             # steps of each continuation on them (full: 100)
fisher_batches = 2         # mini-batches of the forget-set Fisher (full: 32, of 32 images)
optimizers = {             # the VDU run under each optimiser: loop + method options
    "adamw": dict(optimizer="adamw", lr=1e-6),
    "sgd-precond": dict(optimizer="sgd", lr=0.1, precondition=True, grad_clip=None),
}
common = dict(stability="posterior", gamma=0.9, steps=2, stop_forget_ratio=1.02, batch_size=16,
              normalization="mean", center="deployed", probe_every=1)
n_samples = 32             # seed-bank samples per model (full: 500)
ddim_steps = 5             # (full: 20)
n_reference = 200          # retained-class test images for u-FID (full: 2000)
bootstrap = 200            # resamples of the PUL interval (full: 1000)
fid_bootstrap = 20         # resamples of the u-FID interval (full: 100)
seed = 0
threads = 1

# %% tags=[]
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from vdu.data import class_split, load_dataset
from vdu.evaluation import EvalConfig, evaluate
from vdu.evaluator import load_evaluator
from vdu.experiments import unlearn_and_measure
from vdu.methods.vdu import StabilityRegularizer
from vdu.models import load_model
from vdu.notebook import check_params
from vdu.posterior import fisher_posterior, load_posterior, make_posterior
from vdu.results import REPO, save_figure, write_results

check_params(dict(n_forget=(n_forget, int, 1), k=(k, int, 2), continuation_steps=(continuation_steps, int, 1),
                  self_samples=(self_samples, int, 1), self_steps=(self_steps, int, 1),
                  fisher_batches=(fisher_batches, int, 1), n_samples=(n_samples, int, 2),
                  ddim_steps=(ddim_steps, int, 1), n_reference=(n_reference, int, 2), bootstrap=(bootstrap, int, 0),
                  threads=(threads, int, 1)))
KINDS = ("snapshots", "continuations", "fisher", "self")
if not posteriors or set(posteriors) - set(KINDS):
    raise ValueError(f"posteriors must name some of {KINDS}, got {posteriors!r}")
torch.set_num_threads(threads)
t_start = time.time()
model_path = REPO / model_dir
unet, sched = load_model(model_path)
evaluator = load_evaluator(REPO / (evaluator_dir or f"checkpoints/{dataset}/evaluator"))
train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
split = class_split(train, test, forget_class, n_forget, n_reference=n_reference, nll_images=0, seed=seed)
evaluation = EvalConfig(n_samples, "ddim", ddim_steps, seed, nll_timesteps=0, bootstrap=bootstrap,
                        fid_bootstrap=fid_bootstrap)
before, _ = evaluate(unet, sched, evaluator, evaluation, split, nll=False)
print(f"class {forget_class}: forget share before {before['forget_share']:.3f} on {n_samples} samples "
      f"(DDIM {ddim_steps}, seed bank {seed}); {len(split.forget)} forget images")

# %% [markdown] tags=[]
# ## The four posteriors
#
# Each is a dict of per-parameter means and variances (`vdu.posterior`); the timings are this run's.

# %% tags=[]
work = Path(tempfile.mkdtemp(prefix="vdu-posteriors-"))
post, build_s = {}, {}
for kind in posteriors:
    t0 = time.time()
    if kind == "snapshots":
        post[kind] = load_posterior(model_path / "posterior.safetensors", unet)
    elif kind == "fisher":
        post[kind] = fisher_posterior(unet, sched, split.forget, batch_size=32, n_batches=fisher_batches, seed=seed)
    else:
        steps = continuation_steps if kind == "continuations" else self_steps
        f = make_posterior(model_path, method=kind, k=k, continuation_steps=steps, self_samples=self_samples,
                           work_dir=work / kind, out=work / f"{kind}.safetensors", progress=False)
        post[kind] = load_posterior(f, unet)
    build_s[kind] = round(time.time() - t0, 1)

sigma = {kind: torch.cat([v.sqrt().flatten() for v in p["var"].values()]) for kind, p in post.items()}
g = torch.Generator().manual_seed(seed)
pick = torch.randperm(len(next(iter(sigma.values()))), generator=g)[:100_000]   # a sample of weights for the ranks


def rank_corr(a, b):
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


ref = posteriors[0]
stats = {}
print(f"{'posterior':>14} {'K':>3} {'sigma* 1%':>10} {'median':>10} {'99%':>10} {'99%/1%':>8} "
      f"{'rank corr. with ' + ref:>26} {'s':>6}")
for kind, s in sigma.items():
    q = torch.quantile(s[pick], torch.tensor([0.01, 0.5, 0.99])).tolist()
    stats[kind] = {"k": post[kind]["k"], "sigma_q01": q[0], "sigma_median": q[1], "sigma_q99": q[2],
                   "spread_99_1": q[2] / q[0], "rank_corr": rank_corr(s[pick], sigma[ref][pick]),
                   "build_s": build_s[kind]}
    st = stats[kind]
    print(f"{kind:>14} {st['k']:>3} {q[0]:>10.2e} {q[1]:>10.2e} {q[2]:>10.2e} {st['spread_99_1']:>8.1f} "
          f"{st['rank_corr']:>26.3f} {build_s[kind]:>6.0f}")

if "fisher" in post:     # how much the forget data says against the unit prior precision
    nf = torch.cat([f.flatten() for f in post["fisher"]["fisher"].values()])[pick] * post["fisher"]["n"]
    q = torch.quantile(nf, torch.tensor([0.01, 0.5, 0.99])).tolist()
    stats["fisher"]["nf_q01"], stats["fisher"]["nf_median"], stats["fisher"]["nf_q99"] = q
    print(f"forget-set Fisher: N F_i at 1% / median / 99%: {q[0]:.1e} / {q[1]:.1e} / {q[2]:.1e} "
          f"(against the prior precision 1)")

fig, ax = plt.subplots(figsize=(6, 3.2))
for kind, s in sigma.items():
    ax.hist(s[pick].clamp_min(1e-6).log10().numpy(), bins=80, histtype="step", label=kind)
ax.set_xlabel("log10 sigma*_i"); ax.set_ylabel("weights (a sample of 100k)"); ax.legend(fontsize=8)
ax.set_title("posterior widths")
fig.tight_layout()
save_figure(fig, dataset, "posteriors-sigma", profile)
plt.show()

# %% [markdown] tags=[]
# ## B's gradient, once by hand
#
# For one parameter tensor, $\partial B/\partial\theta_i=(\theta_i-\mu^*_i)/(P\sigma^{*2}_i)$, checked
# against autograd of `StabilityRegularizer` at weights nudged off $\mu^*$.

# %% tags=[]
kind = posteriors[-1]
reg = StabilityRegularizer(unet, post[kind], center="deployed")
name, p = next(iter(unet.named_parameters()))
P = sum(q.numel() for q in unet.parameters())
with torch.no_grad():
    saved = p.detach().clone()
    p.add_(1e-3 * torch.randn(p.shape, generator=g))
grad = torch.autograd.grad(reg(unet), p)[0]
by_hand = (p.detach() - post[kind]["deployed"][name]) / (P * post[kind]["var"][name].clamp_min(reg.var_floor))
with torch.no_grad():
    p.copy_(saved)
err = ((grad - by_hand).abs().max() / by_hand.abs().max()).item()
print(f"{kind}, {name}: max relative difference between autograd and the formula {err:.2e}")

# %% [markdown] tags=[]
# ## VDU with each posterior
#
# The paper's VDU ($B$ from the posterior) at $\gamma$ = `common["gamma"]`, where $B$ binds, with the stop rule
# on, under each optimiser. Every model is measured on the same seed bank as the pretrained one; PUL carries
# its paired-bootstrap interval.

# %% tags=[]
rows = []
for kind in posteriors:
    for opt_name, opt in optimizers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = unlearn_and_measure(unet, sched, evaluator, split, before, {**common, **opt, "seed": seed},
                                    evaluation, post[kind], nll=False, name=f"{kind}/{opt_name}")
        rows.append({**r, "posterior": kind, "optimizer": opt_name})
        ci = r["pul_ci"] or [r["pul"], r["pul"]]
        print(f"{kind:>14} {opt_name:>12}: PUL {r['pul']:5.1f}% [{ci[0]:5.1f}, {ci[1]:5.1f}]  u-FID x{r['u_fid_ratio']:.2f}  "
              f"confident {r['confident_share_after']:.2f}  ({r['steps']} steps, {r['stop']}, {r['unlearn_s']:.0f} s)")

fig, ax = plt.subplots(figsize=(6, 3.4))
for opt_name, marker in zip(optimizers, "os^v"):
    rs = [r for r in rows if r["optimizer"] == opt_name]
    ci = [r["pul_ci"] or [r["pul"], r["pul"]] for r in rs]
    ax.errorbar([r["u_fid_ratio"] for r in rs], [r["pul"] for r in rs],
                yerr=[[r["pul"] - c[0] for r, c in zip(rs, ci)], [c[1] - r["pul"] for r, c in zip(rs, ci)]],
                fmt=marker, capsize=3, label=opt_name)
    for r in rs:
        ax.annotate(r["posterior"], (r["u_fid_ratio"], r["pul"]), fontsize=7)
ax.set_xlabel("u-FID after / before"); ax.set_ylabel("PUL % (95% CI)"); ax.legend(fontsize=8)
ax.set_title(f"VDU (paper's B), class {forget_class}, gamma {common['gamma']}")
fig.tight_layout()
save_figure(fig, dataset, "posteriors-vdu", profile)
plt.show()

# %% [markdown] tags=[]
# ## Adapt this to your own model
#
# Without checkpoints or training data, the Fisher of your forget set is the cheapest posterior, and the
# model's own samples the one that needs nothing else:
#
# ```python
# from vdu.posterior import fisher_posterior, make_posterior
# post = fisher_posterior(unet, sched, my_forget_images, batch_size=32, n_batches=32)      # a dict
# path = make_posterior("path/to/model", method="self", k=3, continuation_steps=100, self_samples=512)
# m = unlearn(unet, my_forget_images, "vdu", sched, posterior=post, stability="posterior", gamma=0.9,
#             optimizer="sgd", precondition=True, lr=0.1, stop_forget_ratio=1.02)
# ```
#
# On the command line: `python -m vdu posterior MODEL --method self --k 3`.

# %% tags=[]
wall = time.time() - t_start
results = {
    "model": model_dir, "forget_class": forget_class, "n_forget": len(split.forget), "common": common,
    "optimizers": optimizers, "k": k, "continuation_steps": continuation_steps, "self_samples": self_samples,
    "self_steps": self_steps, "fisher_batches": fisher_batches,
    "evaluation": {"n_samples": n_samples, "sampler": f"DDIM {ddim_steps}", "seed_bank": seed,
                   "bootstrap": bootstrap, "u_fid_reference": n_reference},
    "forget_share_before": before["forget_share"], "sigma": stats, "rows": rows, "wall_time_s": round(wall, 1),
}
path = write_results(dataset, "posteriors", results, profile)
print(f"wrote {path.relative_to(REPO)} ({wall / 60:.1f} min)")

# %% [markdown] tags=[]
# ## Checks

# %% tags=[]
assert err < 1e-4, f"B's gradient differs from its formula ({err:.2e})"
assert all(s["sigma_q01"] > 0 and s["sigma_q01"] <= s["sigma_median"] <= s["sigma_q99"] for s in stats.values())
assert len(rows) == len(posteriors) * len(optimizers) and all(r["n_samples"] == n_samples for r in rows)
if "fisher" in stats:    # Laplace with a unit prior: no variance above the prior's
    assert stats["fisher"]["sigma_q99"] <= 1.0 + 1e-6
print("checks passed: B's gradient, posterior quantiles, one row per posterior and optimiser")
