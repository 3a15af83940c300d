"""Command line: ``python -m vdu {pretrain,export,posterior,evaluator,card} ...`` (see README)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _add_config_args(p: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        if f.type in ("dict",) or f.name == "model_overrides":
            continue
        default = f.default
        if f.type == "bool":
            p.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default)
        else:
            typ = {"int": int, "float": float}.get(f.type.split(" |")[0], str)
            p.add_argument(f"--{f.name.replace('_', '-')}", type=typ, default=default)


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
    p = sub.add_parser("posterior", help="K-checkpoint posterior statistics (vdu.posterior)")
    p.add_argument("model_dir")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--k", type=_int_at_least(2), default=4, help="checkpoints in the posterior (>= 2)")
    p.add_argument("--method", default="snapshots", choices=["snapshots", "continuations", "self"],
                   help="snapshots: late snapshots of --run-dir; continuations: K seeded continuations of training; "
                        "self: the same on the model's own samples (no data needed)")
    p.add_argument("--continuation-steps", type=_int_at_least(1), default=200)
    p.add_argument("--overwrite", action="store_true", help="replace an existing posterior.safetensors")
    p = sub.add_parser("evaluator", help="train the evaluator classifier of a dataset (vdu.evaluator)")
    p.add_argument("--dataset", default="mnist", choices=sorted(SPECS))
    p.add_argument("--epochs", type=_int_at_least(1), default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--init", default=None, help="fine-tune this evaluator folder")
    p.add_argument("--lr", type=_positive_float, default=2e-3)
    p = sub.add_parser("card", help="evaluate a model and write card.json + samples.png (vdu.cards)")
    p.add_argument("model_dir")
    p.add_argument("--evaluator", required=True)
    p.add_argument("--n", type=_int_at_least(2), default=1000, help="samples to evaluate (>= 2: FID needs two)")
    p.add_argument("--steps", type=_int_at_least(1), default=50, help="DDIM steps for the samples")
    p.add_argument("--nll-images", type=_int_at_least(1), default=256)
    p.add_argument("--notes", default="", help="free text stored in the card (how the run went)")
    p = sub.add_parser("report", help="rewrite the README tables from results/ (vdu.report)")
    p.add_argument("--check", action="store_true", help="only check that the README tables match results/ (exit 1 if not)")
    a = ap.parse_args(argv)

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
    elif a.cmd == "posterior":
        from .posterior import make_posterior
        print(make_posterior(a.model_dir, a.run_dir, a.k, a.method, a.continuation_steps, overwrite=a.overwrite))
    elif a.cmd == "evaluator":
        from .evaluator import train_evaluator
        print(json.dumps(train_evaluator(a.dataset, a.out, epochs=a.epochs, seed=a.seed, init=a.init, lr=a.lr,
                                                command=" ".join(["python -m vdu"] + (argv or sys.argv[1:]))), indent=2))
    elif a.cmd == "card":
        from .cards import model_card
        print(json.dumps(model_card(a.model_dir, a.evaluator, n=a.n, ddim_steps=a.steps,
                                    nll_images=a.nll_images, notes=a.notes,
                                    command=" ".join(["python -m vdu"] + (argv or sys.argv[1:]))), indent=2))
    elif a.cmd == "report":
        from .report import main as report
        return report(check=a.check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
