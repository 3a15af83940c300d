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
# Panda et al., "Variational Diffusion Unlearning" (arXiv 2510.04058) — docs/mathematics.md §1. This notebook
# derives the objective, states its hazards, and runs it through the package's single entry point
# `vdu.unlearning.unlearn(model, forget_data, method="vdu", ...)`; the loss lives in `vdu.methods.vdu`, one of the methods of `vdu.methods`.
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
# **A second stability term: the same KL, measured on the model's outputs.** `B` is a *parameter-space*
# stand-in for "stay close to what the pretrained posterior allows". The quantity it protects is the
# model's *distribution*; docs/mathematics.md §2 gives that divergence directly: for two diffusion models with
# the same forward process, pathwise `KL(q ‖ p_θ) ≤ Σ_t w_t E_{x_0∼q, ε}‖ε_θ(x_t, t) − ε_q(x_t, t)‖²`
# (FU's objective). Its expectation is over the *pretrained model's* samples, which cost nothing and
# need no retain data, so the data constraint is kept. `stability="function"` uses it (C_t = 1, mean over
# pixels, replay samples drawn once from a seed bank) in place of B:
#
# $$B_\text{fn}(\theta) = \mathbb E_{x_0\sim q,\,t,\,\epsilon}\,\|\epsilon_\theta(x_t,t) - \epsilon_{\theta^*}(x_t,t)\|^2,
# \qquad L = \gamma B_\text{fn} + (1-\gamma) A .$$
#
# This is *our* variant, not the paper's; the notebook runs both and reports which one holds the model.
#
# ## Hazards (measured below, not assumed)
# 1. **Unbounded A.** Minimising A *raises* the forget denoising loss without limit: nothing in A
#    says "enough". Only B and the number of steps keep the model alive — so the run needs a stop rule.
# 2. **The lower-bound direction.** The substitution replaces `log p(D_f | θ)` by a *lower* bound
#    (−ELBO loss). We *minimise* the log-likelihood, so we minimise a lower bound of it: making the
#    bound small does not make the likelihood small (the bound can be loosened instead — e.g. by a
#    network that predicts noise badly at some t while the model's samples barely change). The
#    likelihood constraint of docs/mathematics.md §2 (LU) and the NLL bound measured on `D_f` are the honest
#    check; we report them.
# 3. **Scale mismatch.** `A` is a batch MSE (~0.03 per pixel for a trained model), `B` a sum over
#    millions of parameters divided by tiny variances. Because AdamW is invariant to the overall
#    scale of the loss, the normalisation only changes the *ratio* of B to A, i.e. the effective γ:
#    `normalization="sum"` (literal) vs `"mean"` (B averaged over parameters, A over pixels and the
#    batch; `vdu.methods.vdu` docstring). Likewise the centre `μ*`: the checkpoint mean (`"mean"`) or
#    the deployed EMA weights θ* (`"deployed"`), from which unlearning starts.
# 4. **Collapse looks like forgetting.** A blank or garbage sample is "not the forgotten class" to
#    the evaluator. Every result reports PUL together with u-FID and the confident share.
#
# **Profiles.** The `parameters` cell is the CPU *smoke* profile (~2-3 min on one thread, what nbval
# runs); `params/vdu_unlearning-full.yaml` is the full profile (all 10 classes, γ / forget-size / K sweeps)
# that writes `results/mnist/vdu_unlearning.json`:
#
# ```
# cd notebooks && papermill vdu_unlearning.ipynb /tmp/vdu-full.ipynb -f params/vdu_unlearning-full.yaml
# ```

# %% tags=["parameters"]
profile = "smoke"          # "full" writes results/mnist/vdu_unlearning.json; anything else a git-ignored subfolder
dataset = "mnist"          # a dataset with a committed DDPM + posterior + evaluator under checkpoints/<dataset>/
model_dir = None           # diffusers folder with posterior.safetensors (default checkpoints/<dataset>/ddpm)
evaluator_dir = None       # default checkpoints/<dataset>/evaluator
forget_class = 1           # the paper's MNIST example
n_forget = 256             # forget-class training images available to the method (the data constraint)
configs = {                # named settings: loop (vdu.unlearning.LoopConfig) + method (vdu.methods.vdu.VDUConfig) fields
    "vdu": dict(stability="posterior", gamma=0.5, lr=1e-6, steps=40, stop_forget_ratio=1.02),   # the paper's B
    "vdu-function": dict(stability="function", gamma=0.8, lr=3e-5, steps=20, stop_forget_ratio=1.3,
                         replay_samples=64, replay_ddim_steps=10),                              # our variant
}
common = dict(batch_size=32, normalization="mean", center="deployed", weighting="simple", probe_every=2)
main_config = "vdu"        # the config of the before/after section
trajectory_steps = 20      # "which works and why": every config (+ NegGrad) without stop rule ... (0: skip)
trajectory_every = 10      # ... evaluated every N steps
neggrad_lr = 1e-6          # NegGrad (gamma = 0) in the trajectories
seed = 0
n_samples = 64             # seed-bank samples per evaluation
table_samples = None       # samples per model of the every-class table (None: n_samples); the full profile uses
                           # the count its 95% interval needs (notebook `evaluation`)
ddim_steps = 10
n_reference = 500          # real retained-class test images for u-FID
nll_images = 16            # forget / retain test images for the NLL bound
nll_timesteps = 10         # stratified t-terms of the NLL bound
ablation_steps = 0         # steps of each normalisation / centre variant of B (0: skip)
classes = []               # full profile: every class x every config -> the 10-row table
gammas = {}                # full profile: {config: [gamma, ...]}, the gamma sweep (PUL vs u-FID)
forget_fractions = []      # full profile: share of the class's training images available
ks = []                    # full profile: K sweep of the posterior B (K seeded continuations of pretraining)
k_gamma = 0.9              # gamma of the K sweep (where B binds; configs["vdu"] otherwise)
continuation_steps = 50    # steps of each continuation in the K sweep
threads = 1
cache_dir = None           # rows computed earlier are read from here, so an interrupted run resumes (full: runs/...)
device = "cpu"             # "cuda": the GPU profile (params/vdu_unlearning-gpu.yaml); the evaluator stays on the CPU

# %% tags=[]
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from vdu.cards import grid_array
from vdu.data import class_split, load_dataset
from vdu.evaluator import load_evaluator
from vdu.evaluation import EvalConfig, evaluate
from vdu.experiments import scale_table, trajectory, unlearn_and_measure
from vdu.models import load_model
from vdu.notebook import check_options, check_params
from vdu.posterior import load_posterior, make_posterior
from vdu.results import REPO, RowCache, folder_digest, machine, save_figure, source_digest, write_results
from vdu.unlearning import LoopConfig, unlearn

torch.set_num_threads(threads)
torch.manual_seed(seed)
t_start = time.time()
model_dir = model_dir or f"checkpoints/{dataset}/ddpm"
evaluator_dir = evaluator_dir or f"checkpoints/{dataset}/evaluator"
model_path = Path(model_dir) if Path(model_dir).is_absolute() else REPO / model_dir
if not (model_path / "unet").exists():
    raise FileNotFoundError(f"no model at {model_path}: commit the MNIST DDPM there (vdu pretrain) or pass "
                            f"-p model_dir /path/to/model")
unet, sched = load_model(model_path, device=device)
evaluator = load_evaluator(REPO / evaluator_dir)
posterior = load_posterior(model_path / "posterior.safetensors", unet)
configs = {name: {**common, **c, "seed": seed} for name, c in configs.items()}
check_options(configs, "vdu")          # a typo in an option fails here, not after an hour
check_params(dict(n_forget=(n_forget, int, 1), n_samples=(n_samples, int, 1),
                  table_samples=(n_samples if table_samples is None else table_samples, int, 1), ddim_steps=(ddim_steps, int, 1),
                  n_reference=(n_reference, int, 1), nll_images=(nll_images, int, 1),
                  nll_timesteps=(nll_timesteps, int, 1), trajectory_steps=(trajectory_steps, int, 0),
                  trajectory_every=(trajectory_every, int, 1), ablation_steps=(ablation_steps, int, 0),
                  continuation_steps=(continuation_steps, int, 1), forget_class=(forget_class, int, 0),
                  threads=(threads, int, 1)))
evaluation = EvalConfig(n_samples, "ddim", ddim_steps, seed, nll_timesteps)
cache = RowCache(None)
if cache_dir:   # every row depends on these and on its own spec: a row on disk with the same key is reused
    cache = RowCache(REPO / cache_dir, code=source_digest(), model=folder_digest(model_path),
                     evaluator=folder_digest(REPO / evaluator_dir),
                     data=dict(dataset=dataset, forget_class=forget_class, n_forget=n_forget, n_reference=n_reference,
                               nll_images=nll_images, seed=seed))


print(machine())
print(f"model: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters; posterior K={posterior['k']} "
      f"({posterior['method']})")
for name, c in configs.items():
    print(f"{name}: {c}")

# %% [markdown] tags=[]
# ## Data: the forget set and the references
# The method sees only `n_forget` training images of the forget class. The evaluation uses test images:
# real retained-class images as the u-FID reference, and small forget / retain sets for the NLL bound.

# %% tags=[]
train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
split = class_split(train, test, forget_class, n_forget, n_reference=n_reference, nll_images=nll_images, seed=seed)
x_forget = split.forget
print(f"forget class {forget_class}: {len(x_forget)} forget images; u-FID reference {len(split.reference)} "
      f"retained-class test images; NLL on {len(split.nll_forget)} + {len(split.nll_retain)} test images, "
      f"{nll_timesteps} t-terms")

# %% [markdown] tags=[]
# ## The posterior and the scale mismatch
# The spread of the K checkpoints sets σ*. At θ* the two terms and their gradients have very
# different sizes, depending on the normalisation and the centre:

# %% tags=[]
std = torch.cat([v.sqrt().flatten() for v in posterior["var"].values()])
print(f"sigma*: median {std.median():.2e}, 1% {std.quantile(0.01):.2e}, 99% {std.quantile(0.99):.2e} "
      f"(floor 1e-4 = sqrt(1e-8): {(std <= 1.0001e-4).float().mean():.1%} of parameters)")
scale_rows = scale_table(unet, sched, posterior, x_forget[:32], len(x_forget), seed)
for r in scale_rows:
    print(f"{r['normalization']:>4} / {r['center']:>8}:  A = {r['A']:+.3e}  B = {r['B']:.3e}   |dA| = {r['grad_A']:.2e}  "
          f"|dB| = {r['grad_B']:.2e}")

# %% [markdown] tags=[]
# ### The central computation, once by hand
#
# On 8 forget images, with one drawn $t$ and $\epsilon$ per image: the forward process
# $x_t=\sqrt{\bar\alpha_t}\,x_0+\sqrt{1-\bar\alpha_t}\,\epsilon$, then
# $A=-\frac1{bD}\sum_i\|\epsilon_i-\epsilon_\theta(x_{t_i},t_i)\|^2$ ($C_t=1$, "mean" normalisation) and
# $B=\frac1P\sum_j(\theta_j-\mu^*_j)^2/(2\sigma^{*2}_j)$ (centre: the checkpoint mean, so $B>0$ at $\theta^*$),
# and $L=\gamma B+(1-\gamma)A$. The library's `vdu_loss` on the same $t$ and $\epsilon$ gives the same numbers.

# %% tags=[]
from vdu.methods.vdu import StabilityRegularizer, vdu_loss

g = torch.Generator().manual_seed(seed)
x0 = x_forget[:8].to(device)
t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g).to(device)
eps = torch.randn(x0.shape, generator=g).to(device)
abar = sched.alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps                        # forward process
with torch.no_grad():
    A = -(eps - unet(xt, t).sample).pow(2).mean()                      # plasticity inducer
    params = dict(unet.named_parameters())
    mu, var = ({n: v.to(device) for n, v in posterior[k].items()} for k in ("mean", "var"))   # the posterior file
    B = sum(((params[n] - mu[n]).pow(2) / (2 * var[n].clamp_min(1e-8))).sum()
            for n in mu) / sum(p.numel() for p in params.values())   # stability regularizer
    gamma_by_hand = 0.5
    L = gamma_by_hand * B + (1 - gamma_by_hand) * A
    lib = vdu_loss(unet, sched, x0, StabilityRegularizer(unet, posterior, center="mean"), gamma_by_hand, t=t, eps=eps)
print(f"by hand: A = {A:+.6f}, B = {B:.6f}, L = {L:+.6f}")
print(f"vdu_loss: A = {lib['A']:+.6f}, B = {lib['B']:.6f}, L = {lib['loss']:+.6f}")
print("identical:", all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in ((A, lib["A"]), (B, lib["B"]), (L, lib["loss"]))))

# %% [markdown] tags=[]
# With `"mean"` normalisation and the centre at θ*, B and its gradient vanish at the start, and a
# parameter drifting by δ feels a pull `γ δ / (P σ*²)` against A's push `(1 − γ) |∂A/∂θ|`: B binds once
# the drift reaches roughly `(1 − γ)/γ · P σ*² |∂A/∂θ|` — about `6e-5 (1 − γ)/γ` per weight here. AdamW moves
# every weight by up to `lr` per step, so `lr` × steps against that radius decides whether γ matters.
# With `"sum"` both terms are multiplied by huge, different factors (A by `N_f T D`, B by `P` relative
# to the mean form), which is the literal objective's scale mismatch.
#
# ## Before: the pretrained model
# Samples from the seed bank `seed` (the same noise for every model below), evaluator labels, u-FID
# against retained-class test images, NLL bound on forget / retain test images.

# %% tags=[]
before, xs_before = evaluate(unet, sched, evaluator, evaluation, split)
print(f"before: forget share {before['forget_share']:.3f}, confident {before['confident_share']:.3f}, "
      f"u-FID {before['u_fid']:.2f}, NLL forget {before['forget_nll']:.3f} / retain {before['retain_nll']:.3f} bits/dim")

# %% [markdown] tags=[]
# ## Which stability term holds the model (and why a stop rule is needed)
# Every config, and NegGrad (A alone), run for `trajectory_steps` steps **without** the stop rule,
# evaluated along the way on the same seed bank. The probe forget loss (fixed images, t and ε) shows
# the runaway: once the model starts to break, raising the forget loss gets easier and the loss
# grows super-linearly — on every class at once, since nothing in A tells the forget class apart.

# %% tags=[]
trajectories = {}
loop_common = {k: v for k, v in common.items() if k in LoopConfig.__dataclass_fields__}  # NegGrad has no B options
runs = {**configs, "neggrad": {**loop_common, "lr": neggrad_lr, "seed": seed}} if trajectory_steps else {}
for name, c in runs.items():
    trajectories[name] = cache.row(lambda: trajectory(unet, sched, evaluator, split, c, evaluation, trajectory_steps,
                                                      trajectory_every, posterior,
                                                      method="neggrad" if name == "neggrad" else "vdu"),
                                   part="trajectory", name=name, config=c, steps=trajectory_steps,
                                   every=trajectory_every, evaluation=evaluation)
    for e in trajectories[name]:
        print(f"{name:>13} step {e['step']:3d}: forget loss x{e['forget_loss_ratio']:.3f}  PUL {e['pul']:6.1f}%  "
              f"confident {e['confident_share']:.2f}  u-FID {e['u_fid']:.2f}")
if trajectories:
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.3))
    for name, tr in trajectories.items():
        st = [e["step"] for e in tr]
        ax[0].plot(st, [e["forget_loss_ratio"] for e in tr], "o-", label=name)
        ax[1].plot(st, [e["pul"] for e in tr], "o-", label=name)
        ax[2].plot(st, [e["u_fid"] for e in tr], "o-", label=name)
    ax[0].set_yscale("log"); ax[0].set_title("probe forget loss / pretrained")
    ax[1].set_title("PUL (%)"); ax[2].set_title("u-FID"); ax[2].set_yscale("log"); ax[2].legend()
    for a in ax:
        a.set_xlabel("step")
    save_figure(fig, dataset, "vdu-trajectories", profile)

# %% [markdown] tags=[]
# ## Unlearning the forget class with the stop rule
# One call; the options are the loop's (`vdu.unlearning.LoopConfig`) and the method's (`vdu.methods.vdu.VDUConfig`). The stop rule measures the forget
# denoising loss on the fixed probe every `probe_every` steps and stops once it reaches
# `stop_forget_ratio` × its pretrained value — the likelihood constraint `E_{D_f}[−log p] ≥ b` of
# docs/mathematics.md §2 expressed through the denoising bound, with `b` set just below the runaway.

# %% tags=[]
cfg = configs[main_config]
t0 = time.time()
unl = unlearn(unet, split, "vdu", sched, posterior=posterior, **{**cfg, "progress": False})
unlearn_s = time.time() - t0
log = unl.unlearn_log
print(f"{main_config}: stopped ({log.stop_reason}) after {log.steps_done} steps, {unlearn_s:.0f} s")
for e in log.events:
    print(" ", e)
fig, ax = plt.subplots(1, 2, figsize=(9, 3))
st = log.steps
ax[0].plot([s["step"] for s in st], [s["A"] for s in st], label="A")
ax[0].plot([s["step"] for s in st], [s["B"] for s in st], label="B")
ax[0].plot([s["step"] for s in st], [s["loss"] for s in st], label="loss"); ax[0].legend(); ax[0].set_xlabel("step")
ax[1].plot([p["step"] for p in log.probes], [p["forget_loss"] for p in log.probes], "o-")
if cfg.get("stop_forget_ratio"):
    ax[1].axhline(cfg["stop_forget_ratio"] * log.probes[0]["forget_loss"], ls="--", c="k", label="stop threshold")
    ax[1].legend()
ax[1].set_title("probe forget L_simple"); ax[1].set_xlabel("step")
save_figure(fig, dataset, "vdu-run", profile);

# %% [markdown] tags=[]
# ## After: same seed bank, same metrics

# %% tags=[]
after, xs_after = evaluate(unl, sched, evaluator, evaluation, split, before=before)
print(f"after:  forget share {after['forget_share']:.3f}, PUL {after['pul']:.1f}%, confident {after['confident_share']:.3f}, "
      f"u-FID {after['u_fid']:.2f} ({after['u_fid'] / before['u_fid']:.2f}x pretrained), "
      f"NLL forget {after['forget_nll']:.3f} / retain {after['retain_nll']:.3f} bits/dim")
fig, ax = plt.subplots(1, 3, figsize=(12, 4))
ax[0].imshow(grid_array(xs_before[:64]), cmap="gray"); ax[0].set_title("before"); ax[0].set_axis_off()
ax[1].imshow(grid_array(xs_after[:64]), cmap="gray"); ax[1].set_title(f"after {main_config} (forget {forget_class})")
ax[1].set_axis_off()
w = 0.4
ax[2].bar([i - w / 2 for i in range(10)], before["counts"], w, label="before")
ax[2].bar([i + w / 2 for i in range(10)], after["counts"], w, label="after")
ax[2].set_xticks(range(10)); ax[2].legend(); ax[2].set_title("evaluator labels")
save_figure(fig, dataset, "vdu-before-after", profile);

# %% [markdown] tags=[]
# ## Normalisation and centre of B: which works and why
# The paper's B under the four combinations, `ablation_steps` steps at the main config's learning
# rate, no stop rule. An unchanged forget loss means B pinned the weights; a huge forget loss with few
# confident samples is a collapse.

# %% tags=[]
ablation = []
for norm in ("mean", "sum") if ablation_steps else ():
    for cen in ("deployed", "mean"):
        c = {**configs["vdu"], "normalization": norm, "center": cen, "steps": ablation_steps, "stop_forget_ratio": None,
             "probe_every": ablation_steps}
        row = cache.row(lambda: unlearn_and_measure(unet, sched, evaluator, split, before, c, evaluation, posterior,
                                                    nll=False, name=f"{norm}/{cen}"),
                        part="ablation", config=c, evaluation=evaluation)
        ablation.append(row)
        print(f"{norm:>4} / {cen:>8}: PUL {row['pul']:.1f}%, confident {row['confident_share_after']:.2f}, "
              f"u-FID {row['u_fid_after']:.2f}")

# %% [markdown] tags=[]
# ## Full profile: every class, the γ trade-off, the data constraint (forget-set size) and K
# Empty lists in the smoke profile. Each row is one `unlearn` call plus one evaluation on the same seed
# bank as the class's pretrained numbers (`vdu.experiments`).

# %% tags=[]
table_evaluation = EvalConfig(n_samples if table_samples is None else table_samples, "ddim", ddim_steps, seed, nll_timesteps)
splits, befores = {}, {}
base_samples = {n_samples: xs_before}  # the pretrained model's seed-bank samples do not depend on the class


def class_data(c, ev=evaluation):
    if c not in splits:
        splits[c] = class_split(train, test, c, n_forget, n_reference=n_reference, nll_images=nll_images, seed=seed)
    if (c, ev.n_samples) not in befores:
        if ev.n_samples not in base_samples:
            base_samples[ev.n_samples] = ev.sample(unet, sched)
        befores[c, ev.n_samples] = evaluate(unet, sched, evaluator, ev, splits[c],
                                            samples=base_samples[ev.n_samples])[0]
    return splits[c], befores[c, ev.n_samples]


def show(r):
    print(f"{r['config']:>13} class {r['forget_class']}: PUL {r['pul']:6.1f}%  u-FID {r['u_fid_before']:.2f} -> "
          f"{r['u_fid_after']:.2f} (x{r['u_fid_ratio']:.2f})  confident {r['confident_share_before']:.2f} -> "
          f"{r['confident_share_after']:.2f}  ({r['steps']} steps, {r['stop']}, {r['unlearn_s']} s)")


table = []
for c in classes:
    for name, cf in configs.items():
        table.append(cache.row(lambda: unlearn_and_measure(unet, sched, evaluator, *class_data(c, table_evaluation), cf,
                                                           table_evaluation, posterior, name=name),
                               part="table", name=name, c=c, config=cf, evaluation=table_evaluation))
        show(table[-1])

# %% [markdown] tags=[]
# **The γ trade-off.** Same class, every config, γ varied (the stop rule stays on, so each point is
# where the constraint was met or the step budget ran out).

# %% tags=[]
gamma_sweep = []
for name, cf in configs.items():
    for gm in gammas.get(name, []):
        r = cache.row(lambda: unlearn_and_measure(unet, sched, evaluator, *class_data(forget_class),
                                                  {**cf, "gamma": gm}, evaluation, posterior, nll=False, name=name),
                      part="gamma", name=name, config={**cf, "gamma": gm}, evaluation=evaluation)
        gamma_sweep.append({**r, "gamma": gm})
        show(r)
if gamma_sweep:
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for name in gammas:
        rs = [r for r in gamma_sweep if r["config"] == name]
        ax.plot([r["u_fid_ratio"] for r in rs], [r["pul"] for r in rs], "o-", label=name)
        for r in rs:
            ax.annotate(f"γ={r['gamma']}", (r["u_fid_ratio"], r["pul"]), fontsize=7)
    ax.axvline(1.5, ls="--", c="k"); ax.axhline(95, ls="--", c="k")
    ax.set_xscale("log"); ax.set_xlabel("u-FID / pretrained u-FID"); ax.set_ylabel("PUL (%)")
    ax.set_title(f"gamma sweep, forget class {forget_class}"); ax.legend()
    save_figure(fig, dataset, "vdu-gamma-sweep", profile)

# %% [markdown] tags=[]
# **The data constraint and K.** Fewer forget images; fewer checkpoints in the posterior (K seeded
# continuations of pretraining, `continuation_steps` each — the committed posterior is K=5 late snapshots).

# %% tags=[]
size_sweep = []
for name, cf in configs.items() if forget_fractions else ():
    for fr in forget_fractions:
        sp = class_split(train, test, forget_class, fraction=fr, n_reference=n_reference, nll_images=nll_images,
                          seed=seed)
        r = cache.row(lambda: unlearn_and_measure(unet, sched, evaluator, sp, class_data(forget_class)[1], cf,
                                                  evaluation, posterior, nll=False, name=name),
                      part="size", name=name, fraction=fr, config=cf, evaluation=evaluation)
        size_sweep.append({**r, "fraction": fr})
        show(r)
k_sweep = []
work = Path(tempfile.mkdtemp(prefix="vdu-k-sweep-"))


def k_row(k):
    pk = load_posterior(make_posterior(model_path, method="continuations", k=k, continuation_steps=continuation_steps,
                                       work_dir=work, out=work / f"posterior-K{k}.safetensors", progress=False), unet)
    r = unlearn_and_measure(unet, sched, evaluator, *class_data(forget_class), {**configs["vdu"], "gamma": k_gamma},
                            evaluation, pk, nll=False, name="vdu")
    return {**r, "K": k, "gamma": k_gamma, "posterior": "continuations", "median_sigma":
            torch.cat([v.sqrt().flatten() for v in pk["var"].values()]).median().item()}


for k in ks:
    k_sweep.append(cache.row(lambda: k_row(k), part="K", k=k, continuation_steps=continuation_steps,
                             config={**configs["vdu"], "gamma": k_gamma}, evaluation=evaluation))
    show(k_sweep[-1])

# %% [markdown] tags=[]
# ## Adapt this to your own class or images
#
# The forget set is all the method sees; the pretrained model is its own reference. To forget another
# class, or your own images, with the function-space variant and the stop rule:
#
# ```python
# from vdu.models import load_model
# from vdu.unlearning import unlearn
# unet, sched = load_model("path/to/your/ddpm")                  # save_pretrained layout
# m = unlearn(unet, my_forget_images, "vdu", sched, stability="function", gamma=0.8, lr=3e-5, steps=80,
#             stop_forget_ratio=1.3, save_to="runs/forgotten", progress=True)   # (N, C, H, W) in [-1, 1]
# m.unlearn_log.stop_reason                                      # "stop_rule", "max_steps", "diverged", ...
# ```
#
# The paper's parameter-space B needs the K-checkpoint posterior of your model (`python -m vdu posterior
# <model> --run-dir <its training run>`), passed as `posterior="<model>/posterior.safetensors"` with
# `stability="posterior"`. `forget_ratio=1.3` instead of the stop rule sets $\gamma$ by the likelihood
# constraint (`constrained_unlearning`). Measure the result with `vdu.evaluation.compare` (`evaluation`).

# %% [markdown] tags=[]
# ## Results file

# %% tags=[]
def clean(d):
    return {k: v for k, v in d.items() if k != "labels"}


numbers = {"configs": configs, "main_config": main_config, "forget_class": forget_class, "n_forget": n_forget,
           "K": posterior["k"], "model_dir": model_dir, "evaluator_dir": evaluator_dir,
           "evaluation": {"samples": n_samples, "table_samples": table_evaluation.n_samples, "ddim_steps": ddim_steps,
                          "seed_bank": seed,
                          "u_fid": f"domain FID (evaluator features) vs {n_reference} retained-class test images",
                          "nll": f"{nll_images} test images, {nll_timesteps} stratified t-terms"},
           "scale_at_theta_star": scale_rows, "trajectories": trajectories, "before": clean(before),
           "after": clean(after), "run": log.summary(), "ablation": ablation, "classes": table,
           "gamma_sweep": gamma_sweep, "size_sweep": size_sweep, "k_sweep": k_sweep,
           "notebook_wall_s": round(time.time() - t_start, 1)}
path = write_results(dataset, "vdu_unlearning", numbers, profile)
print("wrote", path.relative_to(REPO))

# %% tags=[]
# NBVAL_CHECK_OUTPUT
print("stop reason is one of the documented ones:", log.stop_reason in ("max_steps", "stop_rule", "diverged", "collapse"))
print("metrics reported together:", all(k in after for k in ("pul", "u_fid", "confident_share", "forget_nll")))
