# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: py:percent,ipynb
#     notebook_metadata_filter: -papermill
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown] tags=[]
# # 1 · The base model: pretraining and evaluating a DDPM
#
# Every unlearning number in this series is a comparison with a pretrained model, so this notebook
# builds and measures that model: a diffusers `UNet2DModel` trained as a DDPM, the **K checkpoints**
# whose spread VDU turns into a posterior over weights, the **evaluator** classifier that labels
# samples, and the metrics (class histogram, confident share, domain FID/KID, NLL bits/dim).
#
# **The model.** The forward process corrupts an image $x_0$ in $T=1000$ steps,
# $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$, $\epsilon\sim\mathcal N(0,I)$,
# and a network $\epsilon_\theta(x_t,t)$ learns to predict the noise:
# $$\ell_\theta(x_0) = \mathbb E_{t,\epsilon}\,\|\epsilon-\epsilon_\theta(x_t,t)\|^2 \qquad (L_\text{simple}, \text{docs/mathematics.md §0}).$$
# The same predictions bound the likelihood:
# $-\log p_\theta(x_0) \le L_T + \sum_{t\ge2} w_t\,\mathbb E\|\epsilon-\epsilon_\theta(x_t,t)\|^2 + L_0$ with
# $w_t = \beta_t^2 / (2\sigma_t^2\alpha_t(1-\bar\alpha_t))$ — `vdu.diffusion.nll_bits_per_dim` evaluates it
# per image, in bits per dimension.
#
# **Profiles.** The `parameters` cell below is the *smoke* profile (a minute on a laptop CPU; what
# `make test` runs through nbval). `make run-all` passes `notebooks/params/pretrain-full.yaml`, which
# evaluates the committed models on 1,000 samples. Neither retrains the committed models: the cards
# in `checkpoints/<dataset>/` record the commands that made them.

# %% tags=["parameters"]
dataset = "mnist"        # mnist | cifar10 | tinyimagenet
profile = "smoke"        # smoke (tests) | full (make run-all)
model_dir = None         # a diffusers folder or hub id; default checkpoints/<dataset>/ddpm
evaluator_dir = None     # default checkpoints/<dataset>/evaluator
demo_steps = 20          # steps of the demonstration pretraining run (0 skips it)
demo_images = 512        # training images the demonstration run uses
n_samples = 64           # samples drawn from the seed bank for the metrics
ddim_steps = 20          # sampler steps per sample
sampler = "ddim"         # ddim | ddpm (ancestral) | dpm (DPM-Solver++)
nll_images = 16          # test images for the bits/dim estimate
nll_timesteps = 20       # stratified t-terms per image of the NLL bound
seed = 0

# %% tags=[]
import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import vdu
from vdu.cards import confident_min_for, evaluate, grid_array
from vdu.data import load_dataset
from vdu.evaluator import load_evaluator, train_evaluator
from vdu.models import load_model
from vdu.notebook import check_params
from vdu.posterior import load_posterior
from vdu.results import REPO, machine, save_figure, write_results
from vdu.training import TrainConfig, pretrain

check_params(dict(demo_steps=(demo_steps, int, 0), demo_images=(demo_images, int, 1), n_samples=(n_samples, int, 1),
                  ddim_steps=(ddim_steps, int, 1), nll_images=(nll_images, int, 1),
                  nll_timesteps=(nll_timesteps, int, 1), seed=(seed, int, 0)))
torch.manual_seed(seed)
ckpt = REPO / "checkpoints" / dataset
print(machine())

# %% [markdown] tags=[]
# ## Data
# Images come from `../shared/data/<dataset>.npz` (or `$VDU_DATA`), scaled to $[-1, 1]$.

# %% tags=[]
train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
print(f"{dataset}: {len(train)} train / {len(test)} test images of shape {train.shape}, classes {train.classes}")
fig, ax = plt.subplots(figsize=(4, 4))
ax.imshow(grid_array(test.images[:64]), cmap="gray"); ax.set_axis_off(); ax.set_title("real test images");

# %% [markdown] tags=[]
# ## Pretraining, resumable
# `vdu.training.pretrain` writes an atomic checkpoint (weights, EMA, optimiser, LR schedule, RNG
# state) every `checkpoint_every` steps; batches come from a per-epoch permutation seeded by
# `(seed, epoch)`, so a killed run resumes to exactly the weights of an uninterrupted one. The last
# K raw-weight snapshots are kept for the posterior. Below, a short demonstration run is interrupted
# half way and resumed (the committed models were trained by the same function for thousands of
# steps; their cards say how long).

# %% tags=[]
if demo_steps:
    demo = TrainConfig(dataset=dataset, steps=demo_steps, batch_size=32, warmup=5, checkpoint_every=5,
                       log_every=5, k_snapshots=3, snapshot_every=2, max_train=demo_images,
                       out=str(REPO / "runs" / "notebooks" / f"{dataset}-demo"))
    import shutil; shutil.rmtree(demo.out, ignore_errors=True)
    pretrain(demo, data=train, until=demo_steps // 2, progress=False)      # "interrupted"
    demo_model = pretrain(demo, data=train, progress=False)                 # resumed to the end
    log = [json.loads(l) for l in open(Path(demo.out) / "log.jsonl")]
    plt.figure(figsize=(4, 2.5)); plt.plot([r["step"] for r in log], [r["loss"] for r in log], "o-")
    plt.xlabel("step"); plt.ylabel("L_simple"); plt.title("demonstration run");
    print(f"demonstration loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}")

# %% [markdown] tags=[]
# ## The committed model and its K-checkpoint posterior
# VDU (docs/mathematics.md §1) needs a diagonal Gaussian $\mathcal N(\mu^*, \operatorname{diag}\sigma^{*2})$ over the
# weights. `vdu.posterior` estimates it from K checkpoints: by default the K late snapshots of the
# pretraining run (SWAG-diagonal), or K short seeded continuations (`method="continuations"`).

# %% tags=[]
model_path = Path(model_dir) if model_dir else ckpt / "ddpm"
if not (model_path / "unet").exists() and profile != "full" and demo_steps:
    print(f"no committed model at {model_path}: the smoke profile evaluates the demonstration run instead")
    model_path = demo_model
unet, sched = load_model(model_path)
card = json.loads((model_path / "card.json").read_text()) if (model_path / "card.json").exists() else \
    json.loads((model_path / "train.json").read_text()) if (model_path / "train.json").exists() else {}
card.setdefault("train_steps", card.get("steps")); card.setdefault("train_wall_s", card.get("wall_s"))
print(f"model {model_path.relative_to(REPO) if model_path.is_relative_to(REPO) else model_path}: "
      f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, "
      f"{card.get('train_steps', '?')} training steps, {card.get('train_wall_s', '?')} s")
if (model_path / "posterior.safetensors").exists():
    post = load_posterior(model_path / "posterior.safetensors", unet)
    std = torch.cat([v.sqrt().log10().flatten() for v in post["var"].values()])
    plt.figure(figsize=(4, 2.5)); plt.hist(std.numpy(), bins=60)
    plt.xlabel("log10 sigma*_i"); plt.title(f"posterior from K={post['k']} {post['method']}");
    print(f"posterior: K={post['k']} ({post['method']}), median sigma* = {10 ** std.median().item():.2e}")

# %% [markdown] tags=[]
# ### The central computation, once by hand: $L_\text{simple}$ on one batch
#
# Draw $t$ and $\epsilon$ per image, noise the images with the forward process, ask the network for the
# noise, and average the squared error over images and pixels; `vdu.diffusion.noise_prediction_error` is the
# library's version of the same three lines (what pretraining minimises and every unlearning method starts from).

# %% tags=[]
from vdu.diffusion import noise_prediction_error

g = torch.Generator().manual_seed(seed)
x0 = test.images[:8]
t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g)
eps = torch.randn(x0.shape, generator=g)
abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
with torch.no_grad():
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps               # forward process
    l_simple = (eps - unet(xt, t).sample).pow(2).mean()             # L_simple
    lib = noise_prediction_error(unet, sched, x0, t=t, eps=eps)[0].mean()
print(f"L_simple by hand {l_simple:.6f}, by vdu.diffusion {lib:.6f}; equal: {torch.allclose(l_simple, lib, rtol=1e-5)}")

# %% [markdown] tags=[]
# ## The evaluator
# A small CNN trained on the real training set (with outlier exposure, so noise, blank and blended
# images get low confidence). Its penultimate features give the *domain* FID/KID (no Inception
# weights are downloadable here; `vdu.metrics.domain_fid(2048, ...)` takes the Inception path).

# %% tags=[]
ev_path = Path(evaluator_dir) if evaluator_dir else ckpt / "evaluator"
if not (ev_path / "model.safetensors").exists():
    if profile == "full":
        raise FileNotFoundError(f"no evaluator at {ev_path}: run `python -m vdu evaluator --dataset {dataset} --out {ev_path}`")
    ev_path = REPO / "runs" / "notebooks" / f"{dataset}-evaluator"
    print(train_evaluator(dataset, ev_path, epochs=1, max_train=2000, progress=False))
ev = load_evaluator(ev_path)
print(json.dumps({k: v for k, v in json.loads((ev_path / "card.json").read_text()).items()
                  if k in ("test_accuracy", "confident_share_test", "confident_share_uniform_noise")}))

# %% [markdown] tags=[]
# ## Samples and metrics
# All samples come from the **seed bank** (sample *i* uses generator `seed + i`), so the unlearning
# notebooks can compare a model with its pretrained self on identical noise. The quality bar asks for
# every class at 5-15% of the samples and a confident share (evaluator max-probability >= 0.9) of at least
# 90% on MNIST; on CIFAR-10 and Tiny ImageNet, where the evaluator is confident on only 34.5% and 53.0% of
# *real* test images, of at least half that share (`vdu.cards.confident_min_for`).

# %% tags=[]
metrics, samples = evaluate(unet, sched, ev, test, n=n_samples, ddim_steps=ddim_steps, nll_images=nll_images,
                            nll_timesteps=nll_timesteps, seed=seed, progress=False, sampler=sampler,
                            confident_min=confident_min_for(dataset, ev_path))
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
axes[0].imshow(grid_array(samples[:100]), cmap="gray"); axes[0].set_axis_off()
axes[0].set_title(f"seed-bank samples (first {min(100, n_samples)} of {n_samples})")
axes[1].bar(range(len(metrics["class_shares"])), metrics["class_shares"])
axes[1].axhspan(0.05, 0.15, color="g", alpha=0.1); axes[1].set_xticks(range(len(train.classes)))
axes[1].set_title(f"evaluator labels; confident {metrics['confident_share']:.0%}")
save_figure(fig, dataset, "pretrain_samples", profile)
print(json.dumps({k: v for k, v in metrics.items() if k != "samples"}, indent=1))

# %% [markdown] tags=[]
# For contrast, the same NLL bound on images that are *not* from the data distribution (uniform
# noise) must be far higher than on test digits — the bound is the likelihood view the
# unlearning notebooks use on forget and retain sets.

# %% tags=[]
from vdu.diffusion import nll_bits_per_dim
noise_bpd = nll_bits_per_dim(unet, sched, (torch.randint(0, 256, (4, *train.shape)) / 127.5 - 1),
                             timesteps=nll_timesteps, progress=False).mean().item()
print(f"bits/dim: test images {metrics['bits_per_dim']['mean']:.3f}, uniform noise {noise_bpd:.3f}")

# %% tags=[]
# NBVAL_CHECK_OUTPUT
print("test images are more likely than noise:", metrics["bits_per_dim"]["mean"] < noise_bpd)

# %% [markdown] tags=[]
# ## Adapt this to your own data
#
# Any image set in $[-1,1]$ works; `vdu.data` reads `.npz` files, a local torchvision root or an
# ImageFolder tree (README, "Your own data or model"). The few lines to change:
#
# ```python
# from vdu.data import from_image_folder
# from vdu.training import TrainConfig, pretrain
# data = from_image_folder("path/to/train", size=32)              # or load_dataset(name, root=...)
# cfg = TrainConfig(dataset="cifar10", steps=20000, out="runs/my-ddpm", k_snapshots=5, snapshot_every=500)
# model_dir = pretrain(cfg, data=data)                           # resumable: rerun the same line after a crash
# ```
#
# then `python -m vdu evaluator --dataset cifar10 --out checkpoints/cifar10/evaluator` for the evaluator,
# `python -m vdu posterior <model> --run-dir runs/my-ddpm` for VDU's posterior and `python -m vdu card
# <model> --evaluator ...` for its card.

# %% tags=[]
out = write_results(dataset, "pretrain", {
    "model": str(model_path.relative_to(REPO) if model_path.is_relative_to(REPO) else model_path),
    "evaluator": str(ev_path.relative_to(REPO) if ev_path.is_relative_to(REPO) else ev_path),
    "train_steps": card.get("train_steps"), "train_wall_s": card.get("train_wall_s"),
    "uniform_noise_bits_per_dim": round(noise_bpd, 4), **metrics}, profile)
print("wrote", out.relative_to(REPO))
