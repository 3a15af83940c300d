"""Variational Diffusion Unlearning (docs/mathematics.md §1) and its function-space variant, as an unlearning method.

VDU, docs/mathematics.md §1 (Panda et al. 2025). With the pretrained posterior approximated by a diagonal
Gaussian ``N(mu*, diag sigma*^2)`` from K checkpoints (``vdu.posterior``) and a point estimate theta:

    B(theta) = sum_i (theta_i - mu*_i)^2 / (2 sigma*_i^2)                 stability regularizer (KL term)
    A(theta) = - sum_{x in D_f} sum_t C_t || eps - eps_theta(x_t, t) ||^2  plasticity inducer (ELBO term)
    L_VDU    = gamma * B + (1 - gamma) * A,   gamma in [0, 1]  (gamma = 1/2: the exact variational objective)

``C_t`` is 1 (``weighting="simple"``, L_simple) or the DDPM ELBO weight ``w_t`` (``weighting="elbo"``,
``vdu.diffusion.elbo_weights``), with ``t ~ U{1..T}`` and fresh ``eps`` per image (Monte Carlo).

**Normalisation** (the scale-mismatch hazard of §1: A is a batch MSE, B a sum over millions of
parameters), switchable by ``normalization``:

- ``"sum"`` — the literal objective: B summed over all P parameters; A an unbiased Monte-Carlo
  estimate of the double sum, ``-(N_f / b) * sum_{x in batch} T * C_t * ||eps - eps_theta||^2``
  (squared error summed over pixels, one t per image, ``N_f = dataset_size`` forget images).
- ``"mean"`` (default) — B averaged over the P parameters; A averaged over the batch and the
  pixels, with ``C_t`` rescaled to mean 1 over t, so that with ``weighting="simple"``
  ``A = -L_simple`` exactly and gamma trades "one parameter's standardised squared drift" against
  "one pixel's squared noise error".

AdamW is invariant to a constant rescaling of the whole loss, so what the normalisation changes is
the *ratio* of the two terms, i.e. the effective gamma: ``"sum"`` multiplies B's weight relative to
A by ``P / (N_f * T * D)`` (D pixels), which is why the literal objective either pins the weights or
(with its huge A) collapses them.

**Centre** ``mu*`` (``center``): ``"mean"`` is the checkpoint mean of the posterior file (the
paper); ``"deployed"`` the weights actually served (theta*, the EMA weights the posterior file
stores as ``deployed``). Unlearning starts from theta*, so with ``"mean"`` B is already large at step
0 and its gradient first pulls the EMA weights towards the (noisier) raw-checkpoint mean; with
``"deployed"`` B is exactly 0 at the start.

**Function-space stability** (``function_space_kl``, our variant, used by ``unlearn(...,
stability="function")``): B replaced by the pathwise ``KL(q || p_theta)`` of docs/mathematics.md §2 estimated on
samples of the pretrained model (replay), i.e. "stay close to the pretrained model" measured on the
outputs instead of through a Gaussian over the parameters. Measured on MNIST (notebooks/vdu_unlearning):
it holds the model where the parameter-space B does not.

**Bounded plasticity** (``plasticity_norm``): A's gradient rescaled to a fixed L2 norm every step (as
SISS does for its negative term), so the push away from D_f cannot run away as A grows without bound.

**Dual-tuned gamma** (``forget_ratio``, beyond the paper): gamma is hand-tuned per model and class, and
the stop rule's ratio by hand too. Posed as a likelihood-constrained problem (docs/mathematics.md §2, LU, on the
forget data's own likelihood bound): ``min B  s.t.  E_{D_f} l_theta >= forget_ratio * E_{D_f} l_theta*``,
whose Lagrangian ``B + lambda (b - E l_theta)`` is, up to a constant and the overall scale,
``gamma B + (1 - gamma) A`` with ``gamma = 1 / (1 + lambda)``. The multiplier is found by projected dual
ascent on the measured violation ``forget_ratio - l_batch / l_0`` (``l_0``: the pretrained forget loss on a
fixed probe), so the run settles on the constraint's boundary instead of needing a stop rule.

**Relation to known methods.** With ``stability="function"`` the stability term is frozen-teacher
noise-prediction distillation on replay samples of the pretrained model: the generative-replay term of
Selective Amnesia and the frozen-teacher target of ESD (with guidance 0), here paired with gradient
ascent on D_f instead of a surrogate target or negative guidance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion import forward_noise, noise_prediction_error, timestep_weights
from ..primal_dual import DualAscent, DualDomain
from .base import Method, mean_over_processes

NORMALIZATIONS = ("mean", "sum")
CENTERS = ("mean", "deployed")
WEIGHTINGS = ("simple", "elbo")


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_gamma(gamma: float) -> float:
    """Raise a ValueError unless 0 <= gamma <= 1 (the weight of B in L_VDU)."""
    if not isinstance(gamma, (int, float)) or not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1] (L = gamma * B + (1 - gamma) * A), got {gamma!r}")
    return float(gamma)


class StabilityRegularizer:
    """``B(theta) = sum_i (theta_i - mu*_i)^2 / (2 sigma*_i^2)`` (docs/mathematics.md §1, the KL term).

    ``posterior`` is the dict of ``vdu.posterior.load_posterior`` (``mean``, ``var``, ``deployed``).
    The variance is floored at ``var_floor``; ``center`` picks mu* ('mean' | 'deployed');
    ``normalization`` 'sum' (literal) or 'mean' (divided by the number of parameters P).
    Parameters of ``model`` are matched by name; a missing or mis-shaped one raises ValueError.
    """

    def __init__(self, model: torch.nn.Module, posterior: dict, center: str = "mean",
                 normalization: str = "mean", var_floor: float = 1e-8):
        _check("center", center, CENTERS)
        _check("normalization", normalization, NORMALIZATIONS)
        if var_floor <= 0:
            raise ValueError(f"var_floor must be > 0, got {var_floor}")
        if center == "mean" and posterior.get("mean") is None:
            raise ValueError("this posterior stores no checkpoint mean (a variance-only file, codec int4-var): use "
                             "center='deployed' (theta*; VDUConfig's default), or a posterior file with the mean")
        src = posterior["mean"] if center == "mean" else posterior.get("deployed") or {}
        if center == "deployed" and not src:
            raise ValueError("posterior has no 'deployed' weights; use center='mean'")
        self.center, self.normalization, self.var_floor = center, normalization, var_floor
        self.names, self.mu, self.prec = [], [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name not in src or name not in posterior["var"]:
                raise ValueError(f"posterior has no statistics for parameter {name!r}: "
                                 f"it was made for a different architecture")
            if src[name].shape != p.shape:
                raise ValueError(f"posterior parameter {name!r} has shape {tuple(src[name].shape)} but the model's "
                                 f"is {tuple(p.shape)}: a different architecture")
            self.names.append(name)
            self.mu.append(src[name].detach().to(p.device, torch.float32))
            # 1 / (2 sigma^2), precomputed once
            self.prec.append(0.5 / posterior["var"][name].detach().to(p.device, torch.float32).clamp_min(var_floor))
        self.num_params = sum(m.numel() for m in self.mu)

    def __call__(self, model: torch.nn.Module, **_) -> torch.Tensor:
        params = dict(model.named_parameters())
        total = sum(((params[n] - mu).pow(2) * pr).sum() for n, mu, pr in zip(self.names, self.mu, self.prec))
        return total / self.num_params if self.normalization == "mean" else total


def stability_regularizer(model, posterior: dict, center: str = "mean", normalization: str = "mean",
                          var_floor: float = 1e-8) -> torch.Tensor:
    """Functional form of :class:`StabilityRegularizer` (builds it once; use the class in loops)."""
    return StabilityRegularizer(model, posterior, center, normalization, var_floor)(model)


def plasticity_inducer(unet, scheduler, x0: torch.Tensor, weighting: str = "simple", normalization: str = "mean",
                       dataset_size: int | None = None, labels=None, generator: torch.Generator | None = None,
                       t: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                       weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = -sum_{x in D_f} sum_t C_t ||eps - eps_theta(x_t, t)||^2`` (docs/mathematics.md §1), Monte Carlo.

    Returns ``(A, per_image)`` where ``per_image`` is the plain per-image L_simple (mean squared error
    over pixels, detached), which is what the run monitors. ``t`` (0-based scheduler indices, one per
    image) and ``eps`` may be given for an exact, reproducible evaluation; otherwise they are drawn
    from ``generator``. See the module docstring for ``normalization``.
    """
    _check("normalization", normalization, NORMALIZATIONS)
    b = len(x0)
    if b == 0:
        raise ValueError("empty forget batch")
    T = scheduler.config.num_train_timesteps
    sq, t = noise_prediction_error(unet, scheduler, x0, labels, generator, t, eps)  # (b, D)
    C = (weights if weights is not None else timestep_weights(scheduler, weighting, normalization)).to(x0.device)[t]
    if normalization == "mean":
        A = -(C * sq.mean(1)).mean()
    else:
        n = dataset_size if dataset_size is not None else b
        A = -(n / b) * T * (C * sq.sum(1)).sum()
    return A, sq.mean(1).detach()


def function_space_kl(unet, teacher, scheduler, x0: torch.Tensor, labels=None, generator=None, t=None,
                      eps=None) -> torch.Tensor:
    """Pathwise ``KL(q || p_theta)`` up to the weights C_t = 1 (docs/mathematics.md §2, FU objective): the mean over
    the batch and pixels of ``||eps_theta(x_t, t) - eps_q(x_t, t)||^2`` with ``x_0 ~ q`` (``x0``: samples
    of the pretrained model ``teacher``), t ~ U{1..T}, x_t from the forward process.

    VDU's ``stability="function"`` uses it in place of B: the same "stay close to the pretrained model"
    term, measured on the model's outputs instead of through a Gaussian over its parameters. Needs
    only the pretrained model (replay samples), so the data-constrained setting is kept."""
    xt, t, _ = forward_noise(scheduler, x0, generator, t, eps)
    with torch.no_grad():
        target = teacher(xt, t, class_labels=labels).sample.float()
    return (unet(xt, t, class_labels=labels).sample.float() - target).pow(2).mean()


class FunctionSpaceRegularizer:
    """``B_fn(theta) = E_{x_0 ~ q} ||eps_theta(x_t, t) - eps_q(x_t, t)||^2`` (:func:`function_space_kl`), the
    function-space stand-in for B used by ``unlearn(..., stability="function")``.

    ``q`` is a frozen copy of ``model`` as it is now (the pretrained model); its replay samples (``n``
    seed-bank samples, DDIM ``ddim_steps``) are drawn once. Each call draws a replay batch of
    ``batch_size`` from ``generator``. Like B with ``normalization="mean"``, it is a per-pixel mean."""

    normalization = "mean"

    def __init__(self, model: torch.nn.Module, scheduler, n: int = 256, ddim_steps: int = 20, seed: int = 12345,
                 class_labels=None):
        import copy

        from ..diffusion import sample
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.scheduler = scheduler
        if n < 1 or ddim_steps < 1:
            raise ValueError(f"the function-space term needs replay_samples >= 1 and replay_ddim_steps >= 1 "
                             f"(got {n}, {ddim_steps})")
        # class-conditional models: replay (and compare on) the unconditional branch, the null class
        self.replay = sample(self.teacher, scheduler, n, seed=seed, steps=ddim_steps, progress=False).cpu()
        self.null = class_labels

    def __call__(self, model: torch.nn.Module, generator=None, labels=None, batch_size: int | None = None):
        idx = torch.randint(0, len(self.replay), (batch_size or len(self.replay),), generator=generator)
        x = self.replay[idx].to(next(model.parameters()).device)
        lab = None if self.null is None else torch.full((len(x),), self.null, device=x.device)
        return function_space_kl(model, self.teacher, self.scheduler, x, lab, generator)


def vdu_loss(unet, scheduler, x0: torch.Tensor, regularizer, gamma: float,
             weighting: str = "simple", dataset_size: int | None = None, generator=None, labels=None,
             t=None, eps=None, weights=None) -> dict:
    """``L_VDU = gamma * B + (1 - gamma) * A`` (docs/mathematics.md §1); the normalisation is the regulariser's.

    ``regularizer``: a :class:`StabilityRegularizer` (the paper's B) or a :class:`FunctionSpaceRegularizer`.

    Returns ``{"loss", "A", "B", "forget_loss"}`` (``forget_loss``: batch-mean L_simple, detached)."""
    gamma = check_gamma(gamma)
    A, per = plasticity_inducer(unet, scheduler, x0, weighting, regularizer.normalization, dataset_size, labels,
                                generator, t, eps, weights)
    B = (regularizer(unet, generator=generator, labels=labels, batch_size=len(x0)) if gamma > 0
         else torch.zeros((), device=x0.device))
    return {"loss": gamma * B + (1 - gamma) * A, "A": A, "B": B, "forget_loss": per.mean()}


STABILITIES = ("posterior", "function")


@dataclass
class VDUConfig:
    gamma: float = 0.5                # weight of B: L = gamma * B + (1 - gamma) * A, in [0, 1] (0.5: the variational objective)
    stability: str = "posterior"      # B: "posterior" (Gaussian over the weights from K checkpoints, the paper) or
                                      #    "function" (pathwise KL(q || p_theta) on replay samples of the pretrained model)
    replay_samples: int = 256         # stability="function": pretrained-model samples drawn once (seed bank replay_seed)
    replay_ddim_steps: int = 20       # DDIM steps of those samples
    replay_seed: int = 12345          # seed bank of the replay samples (not the evaluation's)
    normalization: str = "mean"       # "mean": B / P and A = batch-pixel mean; "sum": the literal sums
    center: str = "deployed"          # mu* of B: "deployed" (theta*, the served weights) or "mean" (checkpoint mean)
    weighting: str = "simple"         # C_t: "simple" (1, L_simple) or "elbo" (DDPM ELBO weights)
    var_floor: float = 1e-8           # floor of sigma*^2 in B
    precondition: bool = False        # scale each gradient by sigma*_i^2 / mean(sigma*^2): mobile where the posterior is wide
    plasticity_norm: float | None = None  # rescale A's gradient to this L2 norm every step (bounded plasticity; None: off)
    forget_ratio: float | None = None  # likelihood constraint: forget L_simple >= ratio x pretrained; gamma is then
                                       #    set by a multiplier (dual ascent) each dual step, starting from gamma (None: off)
    dual_lr: float = 1.0              # forget_ratio: step of the dual ascent on lambda (gamma = 1 / (1 + lambda)), per unit of ratio
    dual_every: int = 5               # forget_ratio: primal steps per dual step (the constraint is averaged over them)
    gamma_min: float = 0.01           # forget_ratio: smallest gamma the dual may reach; pinned there while violated = infeasible
    dual_patience: int = 20           # forget_ratio: dual steps at gamma_min with the constraint violated before "infeasible"


def _resolve_posterior(posterior, model):
    from ..posterior import load_posterior
    if posterior is None:
        raise ValueError("method 'vdu' with stability='posterior' needs the K-checkpoint posterior (docs/mathematics.md §1): "
                         "pass posterior= a posterior.safetensors path (make it with `python -m vdu posterior "
                         "MODEL_DIR`) or the dict of vdu.posterior.load_posterior; or use stability='function', "
                         "which needs none")
    if isinstance(posterior, (str, __import__("os").PathLike)):
        return load_posterior(posterior, model)  # raises for another architecture
    return posterior


class VDU(Method):
    """Variational Diffusion Unlearning: ``L = gamma * B + (1 - gamma) * A`` from the forget set alone.

    Paper settings (docs/mathematics.md §1): gamma = 1/2 is the variational objective; the paper tunes gamma per
    model. Settings measured here on the MNIST DDPM (notebooks/vdu_unlearning): the posterior B with
    gamma 0.5, AdamW 1e-6 and a stop at forget loss 1.02x did not unlearn a class; the function-space
    variant with gamma 0.8, AdamW 3e-5, <= 80 steps and a stop at 1.3x did on 5/10 classes."""

    name = "vdu"
    Config = VDUConfig
    needs = ("forget",)               # + the posterior (stability="posterior") or replay + teacher ("function")
    null_strength = {"gamma": 1.0}

    def __init__(self, model, data, config, scheduler, null_class, posterior=None):
        super().__init__(model, data, config, scheduler, null_class, posterior)
        c = config
        check_gamma(c.gamma)
        _check("normalization", c.normalization, NORMALIZATIONS)
        _check("center", c.center, CENTERS)
        _check("weighting", c.weighting, WEIGHTINGS)
        _check("stability", c.stability, STABILITIES)
        if c.plasticity_norm is not None and not c.plasticity_norm > 0:
            raise ValueError(f"plasticity_norm must be > 0 or None, got {c.plasticity_norm!r}")
        if c.stability == "posterior":
            self.reg = StabilityRegularizer(model, _resolve_posterior(posterior, model), c.center, c.normalization,
                                            c.var_floor)
        else:
            if c.normalization != "mean":
                raise ValueError("stability='function' is a per-pixel mean: use normalization='mean'")
            self.reg = FunctionSpaceRegularizer(model, scheduler, c.replay_samples, c.replay_ddim_steps,
                                                c.replay_seed, null_class)
        self.weights = timestep_weights(scheduler, c.weighting, c.normalization)
        self.dual = None
        if c.forget_ratio is not None:
            if not (isinstance(c.forget_ratio, (int, float)) and 0 < c.forget_ratio < float("inf")):
                raise ValueError(f"forget_ratio must be a finite number > 0 or None, got {c.forget_ratio!r}")
            if not 0 < c.gamma_min <= c.gamma <= 1 or c.gamma_min >= 1:
                raise ValueError(f"need 0 < gamma_min <= gamma <= 1 and gamma_min < 1, got gamma_min {c.gamma_min!r}, "
                                 f"gamma {c.gamma!r}")
            if not (isinstance(c.dual_lr, (int, float)) and c.dual_lr >= 0):
                raise ValueError(f"dual_lr must be >= 0, got {c.dual_lr!r}")
            for k in ("dual_every", "dual_patience"):
                v = getattr(c, k)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
            cap = (1 - c.gamma_min) / c.gamma_min
            self.dual = DualAscent(DualDomain("lu", 1, cap=[cap]), c.dual_lr, c.dual_every, [(1 - c.gamma) / c.gamma],
                                   c.dual_patience)
            self.l0 = self._forget_probe(model, data.forget, null_class, data.forget_class)
        self.precond = None
        if c.precondition:
            if not isinstance(self.reg, StabilityRegularizer):
                raise ValueError("precondition=True needs stability='posterior' (the posterior variances)")
            var = [0.5 / pr for pr in self.reg.prec]           # sigma*^2 (floored), in parameter order
            mean_var = sum(v.sum() for v in var) / sum(v.numel() for v in var)
            self.precond = [v / mean_var for v in var]         # relative mobility: mean 1, so lr keeps its meaning

    @torch.no_grad()
    def _forget_probe(self, model, x, null, concept, n: int = 256, seed: int = 7919) -> float:
        """Pretrained forget L_simple on up to ``n`` forget images, fixed stratified t and eps."""
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(len(x), generator=g)[:n]]
        T = self.scheduler.config.num_train_timesteps
        t = ((torch.arange(len(x)) + torch.rand(len(x), generator=g)) * T / len(x)).long().clamp_max(T - 1)
        eps = torch.randn(x.shape, generator=g)
        dev = next(model.parameters()).device
        lab = None if null is None else torch.full((len(x),), null if concept is None else concept, device=dev)
        was = model.training
        model.eval()
        sq, _ = noise_prediction_error(model, self.scheduler, x.to(dev), lab, t=t.to(dev), eps=eps.to(dev))
        model.train(was)
        return float(sq.mean())

    def current_gamma(self) -> float:
        return self.config.gamma if self.dual is None else float(1.0 / (1.0 + self.dual.lam[0]))

    def loss(self, model, batch):
        out = vdu_loss(model, self.scheduler, batch.forget, self.reg, self.current_gamma(), self.config.weighting,
                       dataset_size=batch.dataset_size, generator=batch.generator, labels=batch.forget_labels,
                       weights=self.weights)
        if self.dual is not None:
            out["gamma"] = self.current_gamma()
            out["_violations"] = self.config.forget_ratio - out["forget_loss"].detach() / self.l0
        return out

    def after_step(self, model, step, out):
        if self.dual is None:
            return None
        self.dual.observe(out["_violations"].reshape(1))
        rec = self.dual.step(step)
        if rec is not None:
            rec["gamma"] = self.current_gamma()
        return rec

    @classmethod
    def accumulates(cls, config):
        return config.plasticity_norm is None     # otherwise A's gradient is rescaled to a fixed norm

    def backward(self, out, params):
        if self.config.plasticity_norm is None:
            return super().backward(out, params)
        gA = mean_over_processes(list(torch.autograd.grad(out["A"], params, retain_graph=True, allow_unused=True)))
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in gA if g is not None))
        scale = (self.config.plasticity_norm / norm.clamp_min(1e-12)).detach()
        g = self.current_gamma()
        (g * out["B"] + (1 - g) * scale * out["A"]).backward()
        mean_over_processes([p.grad for p in params])

    def transform_grads(self, params):
        if self.precond is not None:
            for p, v in zip(params, self.precond):
                if p.grad is not None:
                    p.grad.mul_(v)
