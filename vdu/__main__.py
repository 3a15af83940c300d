"""Command line: ``python -m vdu {pretrain,export,posterior,evaluator,card,unlearn,evaluate,fetch,run-all,report} ...``
(see README; ``python -m vdu unlearn --method NAME --help`` lists that method's options)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _field_help(cls) -> dict:
    """The comment beside each field of a config dataclass (with its continuation lines): the flag's help."""
    import inspect
    import re
    out, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        m = re.match(r"(\w+)\s*:[^#=]*(?:=[^#]*)?#\s?(.*)$", text)
        if m:
            last = m.group(1)
            out[last] = m.group(2).strip()
        elif text.startswith("#") and last and not text.lstrip("#").strip().startswith("---"):
            out[last] += " " + text.lstrip("#").strip()
        else:
            last = None
    return out


def _add_config_args(p: argparse.ArgumentParser, cls, skip=()) -> None:
    """One flag per field of the dataclass ``cls`` (its comment as help); ``X | None`` fields take "none"."""
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, default = f"--{f.name.replace('_', '-')}", f.default
        if f.type == "dict":        # a JSON object, e.g. --model-overrides '{"layers_per_block": 1}'
            def parse_json(text):
                try:
                    value = json.loads(text)
                except ValueError as e:
                    raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r} ({e})") from None
                if not isinstance(value, dict):
                    raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got {text!r}")
                return value
            p.add_argument(flag, type=parse_json, default={},
                           help=(helps.get(f.name, "") + " (a JSON object; default: {})").replace("%", "%%"))
            continue
        doc = (helps.get(f.name, "") + f" (default: {default})").replace("%", "%%")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps.get(f.name, "").replace("%", "%%"))
            continue
        base = f.type.split("|")[0].strip()
        optional = "None" in f.type
        if base == "tuple":
            p.add_argument(flag, type=int, nargs="+", default=default, help=doc)
            continue
        conv = {"int": int, "float": float}.get(base, str)

        def parse(text, conv=conv, optional=optional):
            if optional and text.lower() == "none":
                return None
            try:
                return conv(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {'an integer' if conv is int else 'a number' if conv is float else 'text'}"
                                                 f"{' or none' if optional else ''}, got {text!r}") from None
        p.add_argument(flag, type=parse, default=default, help=doc)


def _main_process() -> bool:
    """False in every process but the first of a run started by ``accelerate launch`` (they print nothing)."""
    import os
    return int(os.environ.get("RANK", "0")) == 0


def _method_of(argv: list[str]) -> str:
    """The --method value of an ``unlearn`` command line (before the full parser exists), default vdu."""
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return "vdu"


def _int_at_least(lo: int):
    """argparse type: an integer >= ``lo`` (a bad value exits with a usage error naming the flag)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {v}")
        return v
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def main(argv: list[str] | None = None) -> int:
    from .data import SPECS
    from .training import TrainConfig

    ap = argparse.ArgumentParser(prog="python -m vdu")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = pre = sub.add_parser("pretrain", help="train or resume a DDPM (vdu.training.TrainConfig)")
    _add_config_args(p, TrainConfig)
    p.add_argument("--overwrite-export", action="store_true",
                   help="replace an existing model folder at the export path (with its card, samples and posterior)")
    p = sub.add_parser("export", help="export the current EMA weights of a (possibly unfinished) run")
    p.add_argument("run_dir")
    p.add_argument("--to", default=None)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing model folder there (with its card, samples and posterior)")
    p = sub.add_parser("average", help="the uniform weight average of model folders (vdu.training.average_models)")
    p.add_argument("out")
    p.add_argument("models", nargs="+", help="two or more model folders of one architecture")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at out")
    p = sub.add_parser("posterior", help="K-checkpoint posterior statistics (vdu.posterior)")
    p.add_argument("model_dir")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--k", type=_int_at_least(2), default=4, help="checkpoints in the posterior (>= 2)")
    p.add_argument("--method", default="snapshots", choices=["snapshots", "continuations", "self"],
                   help="snapshots: late snapshots of --run-dir; continuations: K seeded continuations of training; "
                        "self: the same on the model's own samples (no data needed)")
    p.add_argument("--continuation-steps", type=_int_at_least(1), default=200)
    p.add_argument("--overwrite", action="store_true", help="replace an existing posterior.safetensors")
    p.add_argument("--codec", default=None, choices=["float16", "int8", "int4", "int4-var"],
                   help="storage of the statistics: float16 (default); int8 (one byte per parameter and statistic, "
                        "half the size); int4 (half a byte each, a quarter); int4-var (the variance only, an eighth: "
                        "serves VDU's default centre theta*) (vdu.posterior)")
    p.add_argument("--recode", action="store_true",
                   help="rewrite MODEL_DIR/posterior.safetensors in --codec (needs --codec and --overwrite) "
                        "instead of making a new one")
    p = sub.add_parser("evaluator", help="train the evaluator classifier of a dataset (vdu.evaluator)")
    p.add_argument("--dataset", default="mnist", choices=sorted(SPECS))
    p.add_argument("--epochs", type=_int_at_least(1), default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--init", default=None, help="fine-tune this evaluator folder")
    p.add_argument("--lr", type=_positive_float, default=2e-3)
    p.add_argument("--arch", default="cnn", choices=["cnn", "lenet"],
                   help="cnn: the evaluator; lenet: the independent second evaluator (with --oe-weight 0)")
    p.add_argument("--oe-weight", type=float, default=0.5, help="outlier-exposure weight (0: none)")
    p = sub.add_parser("card", help="evaluate a model and write card.json + samples.png (vdu.cards)")
    p.add_argument("model_dir")
    p.add_argument("--evaluator", required=True)
    p.add_argument("--n", type=_int_at_least(2), default=1000, help="samples to evaluate (>= 2: FID needs two)")
    from .diffusion import SAMPLERS
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS,
                   help="how the card's samples are drawn: ddim (eta 0), ddpm (ancestral) or dpm (DPM-Solver++)")
    p.add_argument("--steps", type=_int_at_least(1), default=50, help="sampler steps for the samples")
    p.add_argument("--nll-images", type=_int_at_least(1), default=256)
    p.add_argument("--seed-bank", type=_int_at_least(0), default=0,
                   help="which seed bank the samples come from (it also picks the NLL's test images and noise)")
    p.add_argument("--notes", default="", help="free text stored in the card (how the run went)")
    from .methods import REGISTRY
    from .unlearning import LoopConfig
    argv = list(sys.argv[1:] if argv is None else argv)
    method = _method_of(argv) if argv and argv[0] == "unlearn" else "vdu"
    p = un = sub.add_parser("unlearn", help="unlearn a class from a model folder and save the result (vdu.unlearning)")
    p.add_argument("model", help="model folder (save_pretrained layout, e.g. checkpoints/mnist/ddpm)")
    p.add_argument("--method", default="vdu", choices=sorted(REGISTRY), help="unlearning method (vdu.methods)")
    p.add_argument("--forget-class", type=int, default=None, help="class to unlearn (the prompt, for conditional models)")
    p.add_argument("--concept", default=None,
                   help="a text prompt to erase from a Stable Diffusion folder (instead of --forget-class; vdu.text2image)")
    p.add_argument("--trainable", default="full", choices=["full", "xattn", "noxattn", "lora"],
                   help="with --concept: the UNet weights that may change (xattn: cross-attention only, ESD-x)")
    p.add_argument("--lora-rank", type=_int_at_least(1), default=4, help="with --trainable lora: the adapters' rank")
    p.add_argument("--concept-samples", type=_int_at_least(1), default=8,
                   help="with --concept: the model's own samples under the prompt that serve as the forget set")
    p.add_argument("--device", default="cpu", help="with --concept: where the model runs (cpu, cuda, cuda:1, ...; "
                   "under accelerate launch, cuda means each process's own GPU)")
    p.add_argument("--n-forget", type=_int_at_least(1), default=1000, help="forget-class training images (D_f)")
    p.add_argument("--n-retain", type=_int_at_least(0), default=None,
                   help="retained-class training images (default: 2000 for methods that use D_r, else 0)")
    p.add_argument("--dataset", default=None, help="dataset of the images (default: the model's train.json, else mnist)")
    p.add_argument("--data-seed", type=int, default=0, help="which forget / retain images are drawn")
    p.add_argument("--posterior", default=None,
                   help="weight posterior file (default: MODEL/posterior.safetensors when the method needs one)")
    p.add_argument("--out", required=True, help="folder for the unlearned model (with unlearn.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a model folder that exists at --out")
    _add_config_args(p, LoopConfig, skip=("save_to", "overwrite", "inplace", "device"))
    if method in REGISTRY:
        _add_config_args(p.add_argument_group(f"options of method {method!r}"), REGISTRY[method].Config)
    p = sub.add_parser("evaluate", help="sample a model and measure it against a forget class (vdu.evaluation)")
    p.add_argument("model")
    p.add_argument("--evaluator", default=None, help="evaluator folder (default: checkpoints/<dataset>/evaluator)")
    p.add_argument("--second-evaluator", default=None,
                   help="an independent evaluator scored beside the first (e.g. checkpoints/mnist/evaluator-lenet)")
    p.add_argument("--forget-class", type=int, default=None, help="class whose share (and u-FID reference) to measure")
    p.add_argument("--dataset", default=None)
    p.add_argument("--n-reference", type=_int_at_least(2), default=2000, help="real retained-class images for u-FID")
    p.add_argument("--nll-images", type=_int_at_least(0), default=64, help="forget / retain test images for the NLL bound")
    from .evaluation import EvalConfig
    _add_config_args(p, EvalConfig)
    p = sub.add_parser("fetch", help="download a standard dataset into the data folder (needs a network; vdu.data)")
    p.add_argument("dataset", choices=sorted(SPECS))
    p.add_argument("--root", default=None, help="data folder (default: $VDU_DATA or ../shared/data)")
    p = sub.add_parser("run-all", help="run every notebook's full profile for the datasets (vdu.notebook.run_all)")
    p.add_argument("--datasets", nargs="+", default=["mnist", "gmm"], help="datasets of the matrix to run "
                   "(mnist gmm cifar10 tinyimagenet; default mnist gmm, the datasets whose base models are final)")
    p.add_argument("--notebooks", nargs="+", default=None, help="only these notebooks (default: all of each dataset)")
    p.add_argument("--force", action="store_true", help="redo notebooks whose full run finished earlier")
    p.add_argument("--dry-run", action="store_true", help="say what would run, run nothing")
    p.add_argument("--gpu", action="store_true", help="the GPU profile: notebooks/params/<notebook>-gpu.yaml over the "
                   "full profile where it exists (device cuda, bfloat16, more samples); needs CUDA")
    p = sub.add_parser("report", help="rewrite the README tables from results/ (vdu.report)")
    p.add_argument("--check", action="store_true", help="only check that the README tables match results/ (exit 1 if not)")
    a = ap.parse_args(argv)
    if a.cmd == "unlearn" and a.method != method:
        ap.error("--method must be given once")

    if a.cmd == "pretrain":
        from pathlib import Path

        from .models import ModelExistsError, check_save_target
        from .training import ConfigError, pretrain
        kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(a, f.name)}
        cfg = TrainConfig(**kw)
        try:  # refuse a bad value before any work, as a usage error naming the flag
            cfg.check()
        except ConfigError as e:
            pre.error(f"argument --{e.field.replace('_', '-')}: {e}")
        try:  # refuse a bad export path before training, not after
            check_save_target(Path(cfg.export) if cfg.export else Path(cfg.out) / "model", a.overwrite_export)
        except ModelExistsError as e:
            ap.error(f"{e} (on the command line: --overwrite-export)")
        print(pretrain(cfg, overwrite_export=a.overwrite_export))
    elif a.cmd == "export":
        from .models import ModelExistsError
        from .training import export_ema
        try:
            print(export_ema(a.run_dir, a.to, overwrite=a.overwrite))
        except ModelExistsError as e:
            ap.error(f"{e} (on the command line: --overwrite)")
    elif a.cmd == "average":
        from .models import ModelExistsError
        from .training import average_models
        if len(a.models) < 2:
            ap.error(f"average needs two or more model folders, got {len(a.models)}")
        try:
            print(average_models(a.models, a.out, overwrite=a.overwrite))
        except ModelExistsError as e:
            ap.error(f"{e} (on the command line: --overwrite)")
    elif a.cmd == "posterior":
        from .posterior import make_posterior, recode_posterior
        if a.recode:
            from pathlib import Path
            from .models import load_model
            if a.codec is None or not a.overwrite:
                ap.error("--recode rewrites the posterior file in place: name the new encoding with --codec and "
                         "confirm with --overwrite (float16 -> int8 cannot be undone)")
            print(recode_posterior(Path(a.model_dir) / "posterior.safetensors", load_model(a.model_dir)[0], a.codec))
        else:
            print(make_posterior(a.model_dir, a.run_dir, a.k, a.method, a.continuation_steps, overwrite=a.overwrite,
                                 codec=a.codec or "float16"))
    elif a.cmd == "evaluator":
        from .evaluator import train_evaluator
        print(json.dumps(train_evaluator(a.dataset, a.out, epochs=a.epochs, seed=a.seed, init=a.init, lr=a.lr,
                                                arch=a.arch, oe_weight=a.oe_weight,
                                                command=" ".join(["python -m vdu"] + (argv or sys.argv[1:]))), indent=2))
    elif a.cmd == "card":
        from .cards import model_card
        print(json.dumps(model_card(a.model_dir, a.evaluator, n=a.n, ddim_steps=a.steps, sampler=a.sampler,
                                    seed=a.seed_bank, nll_images=a.nll_images, notes=a.notes,
                                    command=" ".join(["python -m vdu"] + (argv or sys.argv[1:]))), indent=2))
    elif a.cmd in ("unlearn", "evaluate"):
        return _unlearn_or_evaluate(a, un if a.cmd == "unlearn" else None, ap)
    elif a.cmd == "fetch":
        from .data import fetch_dataset
        try:
            print(fetch_dataset(a.dataset, a.root))
        except FileExistsError as e:
            ap.error(str(e))
    elif a.cmd == "run-all":
        from .notebook import NoGPUError, run_all
        try:
            run_all(a.datasets, a.notebooks, force=a.force, dry_run=a.dry_run, gpu=a.gpu)
        except (ValueError, NoGPUError) as e:
            ap.error(str(e))
    elif a.cmd == "report":
        from .report import main as report
        return report(check=a.check)
    return 0


def _dataset_of(model: str, given: str | None) -> str:
    from pathlib import Path
    if given:
        return given
    tj = Path(model) / "train.json"
    return json.loads(tj.read_text()).get("config", {}).get("dataset", "mnist") if tj.exists() else "mnist"


def _unlearn_or_evaluate(a, parser, ap) -> int:
    from pathlib import Path

    from .data import class_split, load_dataset
    from .models import ModelExistsError, load_model
    if a.cmd == "unlearn" and (a.concept is None) == (a.forget_class is None):
        parser.error("give --forget-class (a class of the model's dataset) or --concept (a prompt), exactly one")
    if a.cmd == "unlearn" and a.concept is not None:
        return _unlearn_concept(a, parser)
    dataset = _dataset_of(a.model, a.dataset)
    unet, sched = load_model(a.model)
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    if a.cmd == "evaluate":
        from .evaluation import EvalConfig, evaluate, numbers_only
        from .evaluator import load_evaluator
        from .results import REPO
        ev = load_evaluator(a.evaluator or REPO / "checkpoints" / dataset / "evaluator")
        cfg = EvalConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(EvalConfig)})
        data = None
        if a.forget_class is not None:
            data = class_split(train, test, a.forget_class, 1, n_reference=a.n_reference, nll_images=a.nll_images)
        second = load_evaluator(a.second_evaluator) if a.second_evaluator else None
        out, _ = evaluate(unet, sched, ev, cfg, data, nll=a.nll_images > 0, progress=True, second=second)
        out = numbers_only(out)
        print(json.dumps({"model": a.model, **out}, indent=2, default=float))
        return 0
    from .methods import get_method
    from .unlearning import LoopConfig, unlearn
    cls = get_method(a.method)
    n_retain = a.n_retain if a.n_retain is not None else (2000 if "retain" in cls.needs else 0)
    data = class_split(train, test, a.forget_class, a.n_forget, n_retain=n_retain, nll_images=0, seed=a.data_seed)
    posterior = a.posterior
    if posterior is None and getattr(a, "stability", None) == "posterior":
        cand = Path(a.model) / "posterior.safetensors"
        posterior = str(cand) if cand.exists() else None
    opts = {f.name: getattr(a, f.name) for f in dataclasses.fields(LoopConfig)
            if hasattr(a, f.name) and f.name not in ("save_to", "overwrite", "inplace", "device")}
    opts.update({f.name: getattr(a, f.name) for f in dataclasses.fields(cls.Config) if hasattr(a, f.name)})
    if opts.get("concepts") is not None:
        opts["concepts"] = tuple(opts["concepts"])
    try:
        m = unlearn(unet, data, a.method, sched, posterior=posterior, save_to=a.out, overwrite=a.overwrite, **opts)
    except ModelExistsError as e:
        parser.error(f"{e} (on the command line: --overwrite)")
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if _main_process():
        print(json.dumps({"saved": a.out, **m.unlearn_log.summary()}, indent=2, default=float))
    return 0

def _unlearn_concept(a, parser) -> int:
    """``unlearn MODEL --concept "..."``: a Stable Diffusion folder; the forget set is the model's own samples
    (VAE latents) under the prompt; the result is a StableDiffusionPipeline folder."""
    from .data import UnlearnData
    from .diffusion import sample
    from .methods import get_method
    from .models import ModelExistsError
    from .text2image import load_text2image
    from .unlearning import LoopConfig, unlearn
    cls = get_method(a.method)
    if a.method not in ("esd", "ru", "neggrad", "vdu") or (a.method == "vdu" and a.stability != "function"):
        parser.error(f"with --concept the methods are esd, ru, neggrad and vdu --stability function (got "
                     f"{a.method!r}{' --stability ' + a.stability if a.method == 'vdu' else ''}): the others need "
                     f"retain images, other classes or a weight posterior, which a prompt does not give")
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and a.device.startswith("cuda"):
        a.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"      # accelerate launch: each process its own GPU
    try:
        unet, sched, _ = load_text2image(a.model, [a.concept], trainable=a.trainable, lora_rank=a.lora_rank,
                                         device=a.device)
    except (FileNotFoundError, ValueError, ImportError) as e:
        parser.error(str(e))
    # the forget set: the model's own samples under the prompt, with the usual guidance (scale 7.5 = 1 + 6.5)
    latents = sample(unet, sched, a.concept_samples, seed=a.data_seed, steps=20, class_labels=0, guidance=6.5,
                     progress=True, device=a.device)
    opts = {f.name: getattr(a, f.name) for f in dataclasses.fields(LoopConfig)
            if hasattr(a, f.name) and f.name not in ("save_to", "overwrite", "inplace", "device")}
    opts.update({f.name: getattr(a, f.name) for f in dataclasses.fields(cls.Config) if hasattr(a, f.name)})
    opts.pop("concepts", None)
    try:
        m = unlearn(unet, UnlearnData(latents, forget_class=0, latent=True), a.method, sched, save_to=a.out,
                    overwrite=a.overwrite, device=a.device, **opts)
    except ModelExistsError as e:
        parser.error(f"{e} (on the command line: --overwrite)")
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if _main_process():
        print(json.dumps({"saved": a.out, "concept": a.concept, "trainable": a.trainable,
                          **m.unlearn_log.summary()}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
