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
# # 2 · Variational Diffusion Unlearning (VDU), derived and run on MNIST
#
# Panda et al., "Variational Diffusion Unlearning" (arXiv 2510.04058) — methods.md §1. This notebook
# derives the objective, states its hazards, and runs it through the package's single entry point
# `vdu.unlearning.unlearn(model, forget_data, method="vdu", ...)`; the loss lives in `vdu.objectives`.
#
# ## Derivation
#
# **Bayes' rule for the retained-data posterior.** Split the training data `D = D_r ∪ D_f` (retain,
# forget), independent given the weights θ. Then `p(D | θ) = p(D_r | θ) p(D_f | θ)` and
#
# $$\log p(\theta \mid D_r) = \log p(\theta \mid D) - \log p(D_f \mid \theta) + \text{const}.$$
#
# The ideal unlearned model is the retained-data posterior `p(θ | D_r)` — what retraining without
# `D_f` would give. Fit a variational `q(θ)` to it:
#
# $$\mathrm{KL}(q \,\|\, p(\theta\mid D_r)) = \mathrm{KL}(q \,\|\, p(\theta\mid D)) + \mathbb E_q[\log p(D_f\mid\theta)] + \text{const}.$$
#
# **Why `D_r` drops out.** The right-hand side needs only the *pretrained* posterior and the
# likelihood of the forget set: all information about `D_r` is already inside `p(θ | D)`. This is
# why VDU works in the data-constrained setting where only (part of) `D_f` is available.
#
# **The Gaussian posterior from K checkpoints.** `p(θ | D)` is intractable; approximate it by a
# diagonal Gaussian `N(μ*, diag σ*²)` whose per-parameter mean and variance are estimated from K
# checkpoints (here: the K late snapshots of the pretraining run, SWAG-diagonal; `vdu.posterior`),
# with a variance floor. With `q` a point mass at θ, the KL term becomes (up to constants) the
# **stability regularizer**
#
# $$B(\theta) = \sum_i \frac{(\theta_i - \mu^*_i)^2}{2\sigma^{*2}_i}.$$
#
# **The ELBO substitution.** `log p(x | θ)` of a diffusion model is intractable too; the DDPM bound
# `-log p(x) ≤ Σ_t w_t E‖ε − ε_θ(x_t, t)‖² + C` gives `log p(x|θ) ≥ -Σ_t w_t E‖·‖² − C`. Substituting
# gives the **plasticity inducer** (`C_t` = the ELBO weights `w_t`, or 1 for L_simple)
#
# $$A(\theta) = -\sum_{x\in D_f}\sum_t C_t\,\|\epsilon - \epsilon_\theta(x_t,t)\|^2, \qquad L_\text{VDU} = \gamma B + (1-\gamma) A .$$
#
# γ = ½ is the exact variational objective (up to a factor 2); other γ temper it.
#
# ## Hazards (measured below, not assumed)
# 1. **Unbounded A.** Minimising A *raises* the forget denoising loss without limit: nothing in A
#    says "enough". Only B and the number of steps keep the model alive — so the run needs a stop rule.
# 2. **The lower-bound direction.** The substitution replaces `log p(D_f | θ)` by a *lower* bound
#    (−ELBO loss). We *minimise* the log-likelihood, so we minimise a lower bound of it: making the
#    bound small does not make the likelihood small (the bound can be loosened instead — e.g. by a
#    network that predicts noise badly at some t while the model's samples barely change). The
#    likelihood constraint of methods.md §2 (LU) and the NLL bound measured on `D_f` are the honest
#    check; we report them.
# 3. **Scale mismatch.** `A` is a batch MSE (~0.03 per pixel for a trained model), `B` a sum over
#    millions of parameters divided by tiny variances. Because AdamW is invariant to the overall
#    scale of the loss, the normalisation only changes the *ratio* of B to A, i.e. the effective γ:
#    `normalization="sum"` (literal) vs `"mean"` (B averaged over parameters, A over pixels and the
#    batch; `vdu.objectives` docstring). Likewise the centre `μ*`: the checkpoint mean (`"mean"`) or
#    the deployed EMA weights θ* (`"deployed"`), from which unlearning starts.
# 4. **Collapse looks like forgetting.** A blank or garbage sample is "not the forgotten class" to
#    the evaluator. Every result reports PUL together with u-FID and the confident share.
#
# **Profiles.** The `parameters` cell is the CPU *smoke* profile (~2-3 min on one thread, what nbval
# runs); `params/vdu_unlearning-full.yaml` is the full profile (all 10 classes, γ / forget-size / K sweeps)
# that writes `results/mnist/vdu.json`:
#
# ```
# cd notebooks && papermill vdu_unlearning.ipynb /tmp/vdu-full.ipynb -f params/vdu_unlearning-full.yaml
# ```

# %% tags=["parameters"]
profile = "smoke"          # "full" writes results/mnist/vdu.json; anything else a git-ignored subfolder
model_dir = "checkpoints/mnist/ddpm"    # diffusers folder with posterior.safetensors (relative to the repo)
evaluator_dir = "checkpoints/mnist/evaluator"
run_dir = "runs/mnist-ddpm"             # pretraining run whose snapshots rebuild the posterior for other K
forget_class = 1           # the paper's MNIST example
gamma = 0.5                # L = gamma * B + (1 - gamma) * A
normalization = "mean"     # "mean" | "sum" (vdu.objectives)
center = "deployed"        # "deployed" (theta*) | "mean" (checkpoint mean)
weighting = "simple"       # C_t: "simple" | "elbo"
steps = 30                 # maximum unlearning steps (the stop rule may end earlier)
batch_size = 32
lr = 1e-4                  # AdamW
n_forget = 256             # forget-class training images available to the method
K = None                   # None: the model's posterior.safetensors; an int: rebuild from K snapshots of run_dir
stop_forget_ratio = 2.0    # stop rule: probe forget loss >= ratio x pretrained (None: off)
probe_every = 1
eval_every = 10            # PUL / confident share along the run (0: off)
seed = 0
n_samples = 64             # seed-bank samples per evaluation
ddim_steps = 10
n_reference = 500          # real retained-class test images for u-FID
nll_images = 16            # forget / retain test images for the NLL bound
nll_timesteps = 10         # stratified t-terms of the NLL bound
ablation_steps = 10        # steps of each normalisation / centre variant (0: skip)
classes = []               # full profile: every class -> the 10-row table
gammas = []                # full profile: gamma sweep (PUL vs u-FID)
forget_fractions = []      # full profile: share of the class's training images available
ks = []                    # full profile: K sweep (needs >= max(ks) snapshots in run_dir)
threads = 1

# %% tags=[]
import copy
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from vdu.cards import grid_array
from vdu.data import load_dataset
from vdu.evaluator import load_evaluator
from vdu.models import load_model
from vdu.posterior import load_posterior, make_posterior
from vdu.results import REPO, machine, save_figure, write_results
from vdu.unlearning import measure, unlearn

torch.set_num_threads(threads)
torch.manual_seed(seed)
t_start = time.time()
model_path = Path(model_dir) if Path(model_dir).is_absolute() else REPO / model_dir
if not (model_path / "unet").exists():
    raise FileNotFoundError(f"no model at {model_path}: commit the MNIST DDPM there (vdu pretrain) or pass "
                            f"-p model_dir /path/to/model")
unet, sched = load_model(model_path)
evaluator = load_evaluator(REPO / evaluator_dir)
post_path = model_path / "posterior.safetensors"
if K is not None:
    post_path = make_posterior(model_path, REPO / run_dir, k=K, out=Path("/tmp") / f"vdu_posterior_K{K}.safetensors",
                               progress=False)
posterior = load_posterior(post_path, unet)
print(machine())
print(f"model: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters; posterior K={posterior['k']} "
      f"({posterior['method']})")

# %% [markdown] tags=[]
# ## Data: the forget set and the references
# VDU sees only `n_forget` training images of the forget class. The evaluation uses test images:
# real retained-class images as the u-FID reference, and small forget / retain sets for the NLL bound.

# %% tags=[]
train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")


def split_for(c, n=None, fraction=None):
    f_train, _ = train.split(c)
    f_test, r_test = test.split(c)
    forget = f_train.take(n, fraction=fraction, seed=seed)
    return (forget.images, r_test.take(n_reference, seed=seed).images,
            f_test.take(nll_images, seed=seed).images, r_test.take(nll_images, seed=seed + 1).images)


x_forget, ref, nll_f, nll_r = split_for(forget_class, n_forget)
print(f"forget class {forget_class}: {len(x_forget)} forget images; u-FID reference {len(ref)} retained-class "
      f"test images; NLL on {len(nll_f)} + {len(nll_r)} test images, {nll_timesteps} t-terms")

# %% [markdown] tags=[]
# ## The posterior and the scale mismatch
# The spread of the K checkpoints sets σ*. At θ* the two terms and their gradients have very
# different sizes, depending on the normalisation and the centre:

# %% tags=[]
from vdu.objectives import StabilityRegularizer, plasticity_inducer

std = torch.cat([v.sqrt().flatten() for v in posterior["var"].values()])
print(f"sigma*: median {std.median():.2e}, 1% {std.quantile(0.01):.2e}, 99% {std.quantile(0.99):.2e} "
      f"(floor 1e-4 = sqrt(1e-8): {(std <= 1.0001e-4).float().mean():.1%} of parameters)")
g = torch.Generator().manual_seed(seed)
scale_rows = []
for norm in ("mean", "sum"):
    for cen in ("deployed", "mean"):
        u = copy.deepcopy(unet)
        reg = StabilityRegularizer(u, posterior, cen, norm)
        B = reg(u)
        gB = torch.autograd.grad(B, list(u.parameters()), allow_unused=True)
        A, _ = plasticity_inducer(u, sched, x_forget[:batch_size], normalization=norm, dataset_size=len(x_forget),
                                  generator=torch.Generator().manual_seed(seed))
        gA = torch.autograd.grad(A, list(u.parameters()))
        nB = torch.sqrt(sum((x ** 2).sum() for x in gB if x is not None)).item()
        nA = torch.sqrt(sum((x ** 2).sum() for x in gA)).item()
        scale_rows.append(dict(normalization=norm, center=cen, A=A.item(), B=B.item(), grad_A=nA, grad_B=nB))
        print(f"{norm:>4} / {cen:>8}:  A = {A.item():+.3e}  B = {B.item():.3e}   |dA| = {nA:.2e}  |dB| = {nB:.2e}")
del u

# %% [markdown] tags=[]
# ## Before: the pretrained model
# Samples from the seed bank `seed` (the same noise for every model below), evaluator labels, u-FID
# against retained-class test images, NLL bound on forget / retain test images.

# %% tags=[]
before, xs_before = measure(unet, sched, evaluator, forget_class, ref, n_samples, ddim_steps, seed,
                            forget_nll_images=nll_f, retain_nll_images=nll_r, nll_timesteps=nll_timesteps)
print(f"before: forget share {before['forget_share']:.3f}, confident {before['confident_share']:.3f}, "
      f"u-FID {before['u_fid']:.2f}, NLL forget {before['forget_nll']:.3f} / retain {before['retain_nll']:.3f} bits/dim")

# %% [markdown] tags=[]
# ## Unlearning the forget class
# One call; the config fields are `vdu.unlearning.UnlearnConfig`. The stop rule measures the
# forget denoising loss on a fixed probe (fixed images, t and ε) every `probe_every` steps and stops
# once it reaches `stop_forget_ratio` × its pretrained value — the likelihood constraint
# `E_{D_f}[−log p] ≥ b` of methods.md §2 expressed through the denoising bound.

# %% tags=[]
cfg = dict(gamma=gamma, normalization=normalization, center=center, weighting=weighting, steps=steps,
           batch_size=batch_size, lr=lr, seed=seed, probe_every=probe_every, stop_forget_ratio=stop_forget_ratio,
           eval_every=eval_every, eval_samples=n_samples, eval_ddim_steps=ddim_steps, eval_seed=seed, progress=False)
t0 = time.time()
unl = unlearn(unet, x_forget, "vdu", sched, posterior=posterior, evaluator=evaluator, forget_class=forget_class, **cfg)
unlearn_s = time.time() - t0
log = unl.unlearn_log
print(f"stopped: {log.stop_reason} after {log.steps_done} steps ({unlearn_s:.0f} s incl. evaluations)")
for e in log.events:
    print(" ", e)

# %% tags=[]
fig, ax = plt.subplots(1, 3, figsize=(12, 3))
st = log.steps
ax[0].plot([s["step"] for s in st], [s["A"] for s in st], label="A"); ax[0].plot([s["step"] for s in st], [s["B"] for s in st], label="B")
ax[0].plot([s["step"] for s in st], [s["loss"] for s in st], label="loss"); ax[0].legend(); ax[0].set_xlabel("step")
ax[1].plot([p["step"] for p in log.probes], [p["forget_loss"] for p in log.probes], "o-")
if stop_forget_ratio:
    ax[1].axhline(stop_forget_ratio * log.probes[0]["forget_loss"], ls="--", c="k", label="stop threshold"); ax[1].legend()
ax[1].set_yscale("log"); ax[1].set_title("probe forget L_simple"); ax[1].set_xlabel("step")
if log.evals:
    ax[2].plot([e["step"] for e in log.evals], [e["forget_share"] for e in log.evals], "o-", label="forget share")
    ax[2].plot([e["step"] for e in log.evals], [e["confident_share"] for e in log.evals], "s-", label="confident share")
    ax[2].legend(); ax[2].set_xlabel("step")
save_figure(fig, "mnist", "vdu-run", profile);

# %% [markdown] tags=[]
# ## After: same seed bank, same metrics

# %% tags=[]
after, xs_after = measure(unl, sched, evaluator, forget_class, ref, n_samples, ddim_steps, seed, before=before,
                          forget_nll_images=nll_f, retain_nll_images=nll_r, nll_timesteps=nll_timesteps)
print(f"after:  forget share {after['forget_share']:.3f}, PUL {after['pul']:.1f}%, confident {after['confident_share']:.3f}, "
      f"u-FID {after['u_fid']:.2f} ({after['u_fid'] / before['u_fid']:.2f}x pretrained), "
      f"NLL forget {after['forget_nll']:.3f} / retain {after['retain_nll']:.3f} bits/dim")
fig, ax = plt.subplots(1, 3, figsize=(12, 4))
ax[0].imshow(grid_array(xs_before[:64]), cmap="gray"); ax[0].set_title("before"); ax[0].set_axis_off()
ax[1].imshow(grid_array(xs_after[:64]), cmap="gray"); ax[1].set_title(f"after VDU (forget {forget_class})"); ax[1].set_axis_off()
w = 0.4
ax[2].bar([i - w / 2 for i in range(10)], before["counts"], w, label="before")
ax[2].bar([i + w / 2 for i in range(10)], after["counts"], w, label="after")
ax[2].set_xticks(range(10)); ax[2].legend(); ax[2].set_title("evaluator labels")
save_figure(fig, "mnist", "vdu-before-after", profile);

# %% [markdown] tags=[]
# ## Normalisation and centre: which works and why
# The same run (no stop rule, `ablation_steps` steps) under the four combinations. Watch the probe
# forget loss *and* the confident share / u-FID: a huge forget loss with few confident samples is a
# collapse, an unchanged forget loss means B pinned the weights.

# %% tags=[]
ablation = []
for norm in ("mean", "sum") if ablation_steps else ():
    for cen in ("deployed", "mean"):
        m = unlearn(unet, x_forget, "vdu", sched, posterior=posterior, **{**cfg, "normalization": norm, "center": cen,
                    "steps": ablation_steps, "stop_forget_ratio": None, "eval_every": 0, "probe_every": ablation_steps})
        r, _ = measure(m, sched, evaluator, forget_class, ref, n_samples, ddim_steps, seed, before=before)
        pr = m.unlearn_log.probes
        ablation.append(dict(normalization=norm, center=cen, steps=ablation_steps, pul=r["pul"],
                             confident_share=r["confident_share"], u_fid=r["u_fid"],
                             forget_loss_ratio=pr[-1]["forget_loss"] / pr[0]["forget_loss"]))
        print(f"{norm:>4} / {cen:>8}: forget loss x{ablation[-1]['forget_loss_ratio']:.2f}, PUL {r['pul']:.1f}%, "
              f"confident {r['confident_share']:.2f}, u-FID {r['u_fid']:.2f}")

# %% [markdown] tags=[]
# ## Full profile: every class, the γ trade-off, the data constraint (forget-set size) and K
# Empty lists in the smoke profile. Each entry is one `unlearn` call with the settings above plus
# one `measure` (the evaluation dominates the cost).

# %% tags=[]
def run_one(c, **over):
    xf, rf, nf, nr = split_for(c, **({"n": n_forget} if "fraction" not in over else {"fraction": over.pop("fraction")}))
    b, _ = measure(unet, sched, evaluator, c, rf, n_samples, ddim_steps, seed, forget_nll_images=nf,
                   retain_nll_images=nr, nll_timesteps=nll_timesteps)
    post = over.pop("posterior", posterior)
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = unlearn(unet, xf, "vdu", sched, posterior=post, **{**cfg, "eval_every": 0, **over})
    secs = time.time() - t0
    a, _ = measure(m, sched, evaluator, c, rf, n_samples, ddim_steps, seed, before=b, forget_nll_images=nf,
                   retain_nll_images=nr, nll_timesteps=nll_timesteps)
    return dict(forget_class=c, n_forget=len(xf), steps=m.unlearn_log.steps_done, stop=m.unlearn_log.stop_reason,
                unlearn_s=round(secs, 1), pul=a["pul"], forget_share_before=b["forget_share"],
                forget_share_after=a["forget_share"], confident_before=b["confident_share"],
                confident_after=a["confident_share"], u_fid_before=b["u_fid"], u_fid_after=a["u_fid"],
                forget_nll_before=b["forget_nll"], forget_nll_after=a["forget_nll"],
                retain_nll_before=b["retain_nll"], retain_nll_after=a["retain_nll"], **over)


table = [run_one(c) for c in classes]
for r in table:
    print(f"class {r['forget_class']}: PUL {r['pul']:5.1f}%  u-FID {r['u_fid_before']:.2f} -> {r['u_fid_after']:.2f}  "
          f"confident {r['confident_before']:.2f} -> {r['confident_after']:.2f}  NLL f {r['forget_nll_before']:.2f} -> "
          f"{r['forget_nll_after']:.2f}  r {r['retain_nll_before']:.2f} -> {r['retain_nll_after']:.2f}  "
          f"({r['steps']} steps, {r['unlearn_s']} s)")
gamma_sweep = [run_one(forget_class, gamma=gm) for gm in gammas]
size_sweep = [run_one(forget_class, fraction=fr) for fr in forget_fractions]
k_sweep = [run_one(forget_class, posterior=load_posterior(make_posterior(
    model_path, REPO / run_dir, k=k, out=Path("/tmp") / f"vdu_posterior_K{k}.safetensors", progress=False), unet), K=k)
    for k in ks]
if gamma_sweep:
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.plot([r["u_fid_after"] / r["u_fid_before"] for r in gamma_sweep], [r["pul"] for r in gamma_sweep], "o-")
    for r in gamma_sweep:
        ax.annotate(f"γ={r['gamma']}", (r["u_fid_after"] / r["u_fid_before"], r["pul"]))
    ax.axvline(1.5, ls="--", c="k"); ax.axhline(95, ls="--", c="k")
    ax.set_xlabel("u-FID / pretrained u-FID"); ax.set_ylabel("PUL (%)"); ax.set_title(f"gamma sweep, class {forget_class}")
    save_figure(fig, "mnist", "vdu-gamma-sweep", profile)

# %% [markdown] tags=[]
# ## Results file

# %% tags=[]
def clean(d):
    return {k: v for k, v in d.items() if k != "labels"}


numbers = {"config": {**cfg, "forget_class": forget_class, "n_forget": n_forget, "K": posterior["k"],
                      "model_dir": model_dir, "evaluator_dir": evaluator_dir},
           "evaluation": {"samples": n_samples, "ddim_steps": ddim_steps, "seed_bank": seed,
                          "u_fid": f"domain FID (evaluator features) vs {n_reference} retained-class test images",
                          "nll": f"{nll_images} test images, {nll_timesteps} stratified t-terms"},
           "scale_at_theta_star": scale_rows, "before": clean(before), "after": clean(after),
           "run": {**log.summary(), "wall_s_with_evals": round(unlearn_s, 1)}, "ablation": ablation,
           "classes": table, "gamma_sweep": gamma_sweep, "size_sweep": size_sweep, "k_sweep": k_sweep,
           "notebook_wall_s": round(time.time() - t_start, 1)}
path = write_results("mnist", "vdu", numbers, profile)
print("wrote", path.relative_to(REPO))

# %% tags=[]
# NBVAL_CHECK_OUTPUT
print("stop reason is one of the documented ones:", log.stop_reason in ("max_steps", "stop_rule", "diverged", "collapse"))
print("metrics reported together:", all(k in after for k in ("pul", "u_fid", "confident_share", "forget_nll")))
