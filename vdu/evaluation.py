"""One evaluation path (docs/mathematics.md §4) for the unlearning loop's monitoring, the experiments, the cards
and the notebooks: an :class:`EvalConfig` says how samples are drawn (count, sampler, steps, seed bank),
:func:`evaluate` draws them and measures the forget-class share, PUL against the model before
unlearning (same seed bank), the confident share, u-FID against real retained-class images and, when
images are given, the forget / retain NLL bound in bits/dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .diffusion import SAMPLERS, forward_noise, nll_bits_per_dim, sample
from .metrics import CONFIDENT, class_histogram, domain_fid, pul
from .models import null_class


@dataclass
class EvalConfig:
    n_samples: int = 256        # seed-bank samples per model
    sampler: str = "ddim"       # "ddim" | "ddpm" | "dpm" (vdu.diffusion.sample)
    steps: int = 20             # sampler steps
    seed: int = 0               # the seed bank (the same for the original and every unlearned model)
    nll_timesteps: int = 10     # stratified t-terms of the NLL bound (0: no NLL)
    bootstrap: int = 1000       # resamples of the 95% intervals of PUL and the shares (0: no intervals)
    fid_bootstrap: int = 100    # resamples of the u-FID interval (each one a 128-d Frechet distance)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.n_samples < 1 or self.steps < 1 or self.nll_timesteps < 0 or self.bootstrap < 0 \
                or self.fid_bootstrap < 0:
            raise ValueError(f"need n_samples >= 1, steps >= 1, nll_timesteps >= 0, bootstrap >= 0 (got "
                             f"{self.n_samples}, {self.steps}, {self.nll_timesteps}, {self.bootstrap})")

    def sample(self, model, scheduler, class_labels=None, progress: bool = False) -> torch.Tensor:
        """``n_samples`` samples of ``model`` from this config's seed bank."""
        return sample(model, scheduler, self.n_samples, seed=self.seed, method=self.sampler, steps=self.steps,
                      class_labels=class_labels, progress=progress)


def evaluate(model, scheduler, evaluator, config: EvalConfig | None = None, data=None, before: dict | None = None,
             nll: bool = True, class_labels=None, progress: bool = False, samples: torch.Tensor | None = None,
             second=None) -> tuple[dict, torch.Tensor]:
    """Sample ``model`` with ``config`` and measure it; returns (numbers, samples).

    ``data`` (a :class:`vdu.data.UnlearnData`) supplies the forget class (forget share; PUL when ``before``
    — this function's numbers for the original model — is given), the u-FID reference and the NLL images
    (a class-conditional model's NLL bound is its unconditional one, under the null class).
    ``numbers["labels"]`` holds the evaluator labels (what PUL of later models is counted against).
    ``samples``: this config's samples of ``model``, drawn earlier (they do not depend on the forget class,
    so one draw of the pretrained model serves every class). ``second``: an independent evaluator scored
    beside the first (:func:`measure`)."""
    cfg = config if config is not None else EvalConfig()
    x = samples if samples is not None else cfg.sample(model, scheduler, class_labels, progress)
    out = {"n_samples": len(x), "sampler": cfg.sampler, "ddim_steps": cfg.steps, "seed_bank": cfg.seed,
           **measure(evaluator, x, data, before, cfg.bootstrap, cfg.fid_bootstrap, cfg.seed, second)}
    if nll and cfg.nll_timesteps > 0 and data is not None:
        null = null_class(model)            # conditional models: the unconditional (null-class) likelihood
        for key, imgs in (("forget_nll", data.nll_forget), ("retain_nll", data.nll_retain)):
            if imgs is not None:
                lab = None if null is None else torch.full((len(imgs),), null)
                out[key] = nll_bits_per_dim(model, scheduler, imgs, class_labels=lab, timesteps=cfg.nll_timesteps,
                                            seed=cfg.seed, progress=False).mean().item()
    return out, x


def measure(evaluator, x: torch.Tensor, data=None, before: dict | None = None, bootstrap: int = 0,
            fid_bootstrap: int = 0, seed: int = 0, second=None) -> dict:
    """The sample metrics of :func:`evaluate` on given samples ``x``: confident share and class counts; with
    ``data.forget_class`` the forget share (and PUL against ``before["labels"]``); with ``data.reference``
    u-FID. Non-finite samples raise (they cannot be scored).

    With ``bootstrap`` > 0 every number also gets a 95% percentile interval (``<name>_ci``): the shares
    by resampling the samples; PUL by a *paired* bootstrap (the same resampled seed-bank indices before
    and after, since both sample sets come from the same noise); u-FID by resampling the samples'
    evaluator features against the fixed reference (``fid_bootstrap`` resamples).

    ``second``: an independent evaluator, as a cross-check: its labels (``labels_second``), forget share and
    PUL (``*_second``, against ``before["labels_second"]``, on the same bootstrap indices) and the share of
    samples on which the two evaluators agree (``label_agreement``)."""
    if not torch.isfinite(x).all():
        raise FloatingPointError("non-finite samples cannot be scored: the model has diverged")
    h = class_histogram(evaluator, x)
    out = {"confident_share": h["confident_share"], "counts": h["counts"], "labels": h["labels"]}
    c = getattr(data, "forget_class", None)
    g = torch.Generator().manual_seed(seed + 99991)
    idx = torch.randint(0, len(x), (bootstrap, len(x)), generator=g) if bootstrap else None
    if idx is not None:
        out["confident_share_ci"] = _percentiles((h["confidence"] >= CONFIDENT).float()[idx].mean(1))
    out.update(_class_numbers(h["labels"], c, before, idx, ""))
    if second is not None:
        h2 = class_histogram(second, x)
        out.update(labels_second=h2["labels"], counts_second=h2["counts"],
                   confident_share_second=h2["confident_share"],
                   label_agreement=(h2["labels"] == h["labels"]).float().mean().item())
        out.update(_class_numbers(h2["labels"], c, before, idx, "_second"))
    if getattr(data, "reference", None) is not None:
        out["u_fid"] = domain_fid(evaluator, x, data.reference)
        out["u_fid_reference"] = len(data.reference)
        if fid_bootstrap:
            out["u_fid_ci"] = fid_interval(evaluator, x, data.reference, fid_bootstrap, seed)
    if bootstrap:
        out["n_bootstrap"] = bootstrap
    return out


def _class_numbers(labels: torch.Tensor, c, before: dict | None, idx, suffix: str) -> dict:
    """Forget share and PUL of one evaluator's ``labels`` (keys end in ``suffix``), with intervals on the
    bootstrap indices ``idx`` (paired with ``before["labels" + suffix]`` for PUL)."""
    if c is None:
        return {}
    out = {f"forget_share{suffix}": (labels == c).float().mean().item()}
    if idx is not None:
        out[f"forget_share{suffix}_ci"] = _percentiles((labels == c).float()[idx].mean(1))
    prev = None if before is None else before.get("labels" + suffix)
    if prev is not None:
        try:
            out[f"pul{suffix}"] = pul(prev, labels, c)
        except ValueError:
            out[f"pul{suffix}"] = float("nan")
        if idx is not None and len(prev) == len(labels):
            n0 = (prev == c).float()[idx].sum(1)
            n1 = (labels == c).float()[idx].sum(1)
            ok = n0 > 0
            out[f"pul{suffix}_ci"] = _percentiles(((n0 - n1) / n0.clamp_min(1) * 100)[ok]) if ok.any() else None
    return out


def numbers_only(numbers: dict) -> dict:
    """``numbers`` without the per-sample label tensors (what a results file or a log keeps)."""
    return {k: v for k, v in numbers.items() if not torch.is_tensor(v)}


def _percentiles(v: torch.Tensor, level: float = 0.95) -> list[float]:
    q = torch.quantile(v.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return [round(float(q[0]), 6), round(float(q[1]), 6)]


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor, sqrt2: torch.Tensor | None = None) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples): the formula of FID,
    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S2^1/2 S1 S2^1/2)^1/2)``, in float64. The trace of the
    matrix square root comes from the eigenvalues of the symmetric ``S2^1/2 S1 S2^1/2`` (same spectrum
    as ``S1 S2``), which stays fast and stable when a covariance is singular (fewer samples than
    features), where a general matrix square root can take minutes. ``sqrt2``: ``S2^1/2``, precomputed."""
    a, b = f1.double(), f2.double()
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    r = _psd_sqrt(s2) if sqrt2 is None else sqrt2
    ev = torch.linalg.eigvalsh(r @ s1 @ r).clamp_min(0)
    return float((a.mean(0) - b.mean(0)).pow(2).sum() + s1.trace() + s2.trace() - 2 * ev.sqrt().sum())


def fid_interval(evaluator, fake: torch.Tensor, real: torch.Tensor, n_boot: int = 100, seed: int = 0,
                 level: float = 0.95) -> list[float]:
    """Percentile interval of the domain FID over bootstrap resamples of ``fake`` (``real`` fixed)."""
    return _percentiles(fid_draws(evaluator, fake, real, n_boot, seed), level)


def fid_draws(evaluator, fake: torch.Tensor, real: torch.Tensor, n_boot: int = 100, seed: int = 0) -> torch.Tensor:
    """The domain FID of ``n_boot`` bootstrap resamples of ``fake`` against the fixed ``real`` features."""
    with torch.no_grad():
        ff = torch.cat([evaluator.features(fake[i:i + 500]).cpu() for i in range(0, len(fake), 500)])
        fr = torch.cat([evaluator.features(real[i:i + 500]).cpu() for i in range(0, len(real), 500)])
    r = _psd_sqrt(torch.cov(fr.double().T))
    g = torch.Generator().manual_seed(seed + 7)
    return torch.tensor([frechet_distance(ff[torch.randint(0, len(ff), (len(ff),), generator=g)], fr, r)
                         for _ in range(n_boot)])


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a share ``p`` observed on ``n`` samples (95% with the default ``z``)."""
    import math
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def samples_needed(forget_share: float, pul: float = 99.0, other: float = 95.0, level: float = 0.95) -> int:
    """Seed-bank samples per model for a measured PUL of ``pul`` % to exclude ``other`` %: the smallest n whose
    Wilson interval for the surviving fraction (1 - PUL) of the ``forget_share * n`` forget-class samples
    stays below 1 - other / 100. The pretrained model's forget share sets the denominator."""
    import math
    if not 0 < forget_share <= 1 or not other < pul <= 100:
        raise ValueError(f"need 0 < forget_share <= 1 and other < pul <= 100 (got {forget_share}, {pul}, {other})")
    z = {0.9: 1.6449, 0.95: 1.96, 0.99: 2.5758}.get(level)
    if z is None:
        raise ValueError(f"level must be 0.9, 0.95 or 0.99, got {level}")
    p, bound = 1 - pul / 100, 1 - other / 100
    for n0 in range(1, 1_000_000):
        if wilson_interval(p, n0, z)[1] < bound:
            return math.ceil(n0 / forget_share)
    raise ValueError("no sample count up to 1e6 resolves these targets")


def evaluate_prompts(model, scheduler, evaluator, config: EvalConfig | None = None, reference=None,
                     erased=(), teacher=None, kl_images=None, progress: bool = False) -> dict:
    """Concept unlearning on a class-conditional model: every prompt k is sampled (``config.n_samples``
    per prompt, seed bank ``config.seed``) and its samples are labelled by the evaluator.

    Per prompt: ``label_accuracy`` (share labelled k, with a 95% bootstrap interval), the confident share
    and, with ``reference`` (an :class:`vdu.data.ImageData` of real labelled images), ``fid``: the domain
    FID of its samples against the real images of class k. For the prompts in ``erased`` the label
    accuracy is the *forget rate* (what is left of the concept). Intervals: ``label_accuracy_ci`` from
    ``config.bootstrap`` resamples of each prompt's samples, ``fid_ci`` from ``config.fid_bootstrap``; the summary's
    intervals average the prompts' resamples (their samples are independent). With ``teacher`` (the pretrained model)
    and ``kl_images`` (labelled real images), ``kl``: the pathwise deviation
    ``E_t ||eps_theta(x_t, k) - eps_q(x_t, k)||^2`` (C_t = 1, per pixel) on noised real images of class k,
    the cost side of concept unlearning. ``summary`` averages the retained prompts."""
    cfg = config if config is not None else EvalConfig()
    null = null_class(model)
    if null is None:
        raise ValueError("evaluate_prompts needs a class-conditional model (one with a null class)")
    erased = {int(k) for k in erased}
    prompts, draws = [], {}
    for k in range(null):
        lab = torch.full((cfg.n_samples,), k, dtype=torch.long)
        x = cfg.sample(model, scheduler, lab, progress)
        m = measure(evaluator, x, None, None, cfg.bootstrap, 0, cfg.seed)
        hit = (m["labels"] == k).float()
        rec = {"prompt": k, "erased": k in erased, "n_samples": len(x), "label_accuracy": float(hit.mean()),
               "confident_share": m["confident_share"]}
        if cfg.bootstrap:
            g = torch.Generator().manual_seed(cfg.seed + 99991 + k)
            d = hit[torch.randint(0, len(x), (cfg.bootstrap, len(x)), generator=g)].mean(1)
            rec["label_accuracy_ci"] = _percentiles(d)
            draws.setdefault("label_accuracy", {})[k] = d
        if reference is not None:
            real = reference.images[reference.labels == k]
            rec["fid"] = domain_fid(evaluator, x, real)
            if cfg.fid_bootstrap:
                d = fid_draws(evaluator, x, real, cfg.fid_bootstrap, cfg.seed + k)
                rec["fid_ci"] = _percentiles(d)
                draws.setdefault("fid", {})[k] = d
        if teacher is not None and kl_images is not None:
            imgs = kl_images.images[kl_images.labels == k]
            g = torch.Generator().manual_seed(cfg.seed + 31 * k)
            with torch.no_grad():
                xt, t, _ = forward_noise(scheduler, imgs, g)
                c = torch.full((len(imgs),), k)
                rec["kl"] = float((model(xt, t, class_labels=c).sample.float()
                                   - teacher(xt, t, class_labels=c).sample.float()).pow(2).mean())
        prompts.append(rec)
    kept = [p for p in prompts if not p["erased"]]
    summary = {k: float(sum(p[k] for p in kept) / len(kept)) for k in ("label_accuracy", "fid", "kl", "confident_share")
               if kept and k in kept[0]}
    for name, d in draws.items():
        if kept:
            summary[f"{name}_ci"] = _percentiles(torch.stack([d[p["prompt"]] for p in kept]).double().mean(0))
    summary.update({f"forget_rate_{p['prompt']}": p["label_accuracy"] for p in prompts if p["erased"]})
    return {"sampler": cfg.sampler, "steps": cfg.steps, "seed_bank": cfg.seed, "n_per_prompt": cfg.n_samples,
            "prompts": prompts, "summary": summary}


def compare(before_model, after_model, scheduler, evaluator, data, configs, second=None,
            progress: bool = False) -> list[dict]:
    """The original and an unlearned model measured side by side under each :class:`EvalConfig` of ``configs``
    (other seed banks, samplers or step counts: how much a reported number depends on them). Per config a
    row ``{"sampler", "steps", "seed_bank", "n_samples", "before", "after"}``; ``after`` holds PUL against
    ``before`` on the same noise, with intervals, and with ``second`` the independent evaluator's numbers.
    The label tensors stay in the rows (``labels``, ``labels_second``) for :func:`pooled_pul`;
    :func:`numbers_only` drops them for a results file."""
    rows = []
    for cfg in configs:
        b, _ = evaluate(before_model, scheduler, evaluator, cfg, data, nll=False, progress=progress, second=second)
        a, _ = evaluate(after_model, scheduler, evaluator, cfg, data, before=b, nll=False, progress=progress,
                        second=second)
        rows.append({"sampler": cfg.sampler, "steps": cfg.steps, "seed_bank": cfg.seed, "n_samples": cfg.n_samples,
                     "before": b, "after": a})
    return rows


def pooled_pul(rows: list[dict], forget_class: int, suffix: str = "", bootstrap: int = 1000, seed: int = 0) -> dict:
    """PUL over the union of several rows of :func:`compare` (e.g. seed banks): forget-class counts summed
    over the rows, with a paired bootstrap interval that resamples the pooled sample indices; ``suffix``
    ``"_second"`` pools the second evaluator's labels."""
    l0 = torch.cat([r["before"]["labels" + suffix] for r in rows]) == forget_class
    l1 = torch.cat([r["after"]["labels" + suffix] for r in rows]) == forget_class
    n0, n1 = int(l0.sum()), int(l1.sum())
    if n0 == 0:
        raise ValueError(f"the original samples contain no class {forget_class}: PUL is undefined")
    idx = torch.randint(0, len(l0), (bootstrap, len(l0)), generator=torch.Generator().manual_seed(seed + 99991))
    b0, b1 = l0.float()[idx].sum(1), l1.float()[idx].sum(1)
    ok = b0 > 0
    return {"pul": (n0 - n1) / n0 * 100.0, "pul_ci": _percentiles(((b0 - b1) / b0.clamp_min(1) * 100)[ok]),
            "n_samples": len(l0), "forget_before": n0, "forget_after": n1}
