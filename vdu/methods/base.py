"""The method interface: what every unlearning method declares and provides to the loop.

A method is a small class with

- ``name`` and a ``Config`` dataclass (its own hyperparameters, a comment per field);
- ``needs``: the data it uses, a subset of :data:`NEEDS` — the loop refuses to run it when any is missing;
- ``loss(model, batch)`` returning ``{"loss": tensor, "forget_loss": tensor, ...terms to log}``, where
  ``forget_loss`` is the batch-mean L_simple on the forget batch (detached; the divergence guard watches it);
- optionally ``backward(out, params)`` (gradient surgery, e.g. a rescaled forget gradient) and
  ``transform_grads(params)`` (e.g. a saliency mask), both called by the loop before clipping;
- optionally ``after_step(model, step, out)``, called after each optimiser step: constrained methods
  (docs/mathematics.md §2) update their multipliers there (``vdu.primal_dual.DualAscent``) and return the dual
  record the loop logs; raising ``vdu.primal_dual.InfeasibleConstraint`` stops the run as infeasible.
  Keys of ``out`` starting with ``_`` are private to the method (e.g. per-constraint violations) and
  are not logged as terms.

The loop (``vdu.unlearning.unlearn``) owns everything else: batching, the optimiser, the stop rule, the
divergence and collapse guards, probes, evaluation, logging and saving.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..diffusion import noise_prediction_error

# What a method can ask for:
#   forget       D_f images (every method gets them; the loop's probe measures on them)
#   retain       D_r images (data-access split of the benchmark: "needs retain data")
#   replay       samples of the pretrained model, drawn once (data-free stand-in for D_r)
#   teacher      a frozen copy of the pretrained model
#   posterior    a weight posterior file (vdu.posterior)
#   conditional  a class-conditional model and the forget class as its prompt
NEEDS = ("forget", "retain", "replay", "teacher", "posterior", "conditional")


@dataclass
class Batch:
    forget: torch.Tensor                      # forget images of this step
    forget_labels: torch.Tensor | None        # what the model is conditioned on for them (concept or null class)
    retain: torch.Tensor | None               # retain images of this step (methods that need retain)
    retain_labels: torch.Tensor | None        # their class labels (conditional models) or the null class
    generator: torch.Generator                # t, eps and any other draw of the step come from here
    dataset_size: int                         # |D_f|
    forget_index: torch.Tensor | None = None  # positions of this step's forget images in D_f (per-image multipliers)


class Method:
    name: str = ""
    Config: type = None
    needs: tuple = ("forget",)
    # config field that sets the method's strength to zero (the contract test: weights stay in place)
    null_strength: dict = {}

    def __init__(self, model, data, config, scheduler, null_class: int | None, posterior=None):
        self.config, self.scheduler, self.null, self.data = config, scheduler, null_class, data
        self.teacher = None
        if "teacher" in self.needs:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    @classmethod
    def accumulates(cls, config) -> bool:
        """Whether micro-batches add up to this method's step (``LoopConfig.grad_accum``): its loss and logged
        terms are batch means and its gradient is the loss's gradient (the base ``backward``). Each micro-batch
        draws its own randomness (t, eps; ESD's and RU's sampling depth), so a run with grad_accum > 1 takes
        steps of the same expectation as grad_accum = 1, from other draws."""
        return cls.backward is Method.backward

    # -- what the loop calls
    def loss(self, model, batch: Batch) -> dict:
        raise NotImplementedError

    def backward(self, out: dict, params: list) -> None:
        """Gradients of the step into ``p.grad``, averaged over processes (``accelerate launch``): a method that
        combines gradients non-linearly averages each part first (:func:`mean_over_processes`)."""
        out["loss"].backward()
        mean_over_processes([p.grad for p in params])

    def transform_grads(self, params: list) -> None:
        pass

    def after_step(self, model, step: int, out: dict) -> dict | None:
        return None

    # -- helpers the methods share
    def denoising(self, model, x, labels, generator, **kw):
        """Per-image L_simple (mean over pixels) of ``x`` and the t used (vdu.diffusion)."""
        sq, t = noise_prediction_error(model, self.scheduler, x, labels, generator, **kw)
        return sq.mean(1), t



def processes() -> int:
    """Number of processes of the run (1 unless started by ``accelerate launch`` or torchrun)."""
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes, in place (a no-op in one process)."""
    if processes() > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def mean_over_processes(tensors: list) -> list:
    """Average ``tensors`` in place over the processes of a run started by ``accelerate launch`` (or torchrun),
    so that every process holds the mean of what each computed on its shard of the batch; ``None`` entries are
    skipped. A no-op in one process. Every process must call it with the same shapes, in the same order."""
    n = processes()
    if n == 1:
        return tensors
    import torch.distributed as dist
    for t in tensors:          # one tensor at a time: no second copy of a large model's gradients
        if t is not None:
            dist.all_reduce(t.data)
            t.data.div_(n)
    return tensors


def check_fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_nonneg(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not float(value) >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)
