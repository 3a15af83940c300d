"""Where notebook runs write their headline numbers and figures (the repo's results convention).

A run in the ``full`` profile writes ``results/<dataset>/<notebook>.json`` (committed; README tables
come from these) and figures beside it; any other profile (the ``smoke`` runs that tests and nbval
execute) writes under ``results/<dataset>/<profile>/``, which git ignores, so a test never
overwrites published numbers.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def results_dir(dataset: str, profile: str = "smoke", root: str | os.PathLike | None = None) -> Path:
    """``results/<dataset>`` for the full profile, ``results/<dataset>/<profile>`` otherwise."""
    base = Path(root) if root else REPO / "results"
    d = base / dataset if profile == "full" else base / dataset / profile
    d.mkdir(parents=True, exist_ok=True)
    return d


def machine() -> str:
    """A one-line description of the hardware a number was measured on."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    return f"CPU {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_results(dataset: str, notebook: str, numbers: dict, profile: str = "smoke",
                  root: str | os.PathLike | None = None) -> Path:
    """Atomically write ``numbers`` (plus profile, machine, date) as ``<notebook>.json``."""
    path = results_dir(dataset, profile, root) / f"{notebook}.json"
    payload = {"notebook": notebook, "dataset": dataset, "profile": profile, "machine": machine(),
               "written": time.strftime("%Y-%m-%d %H:%M:%S"), **numbers}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    os.replace(tmp, path)
    return path


def save_figure(fig, dataset: str, name: str, profile: str = "smoke", root: str | os.PathLike | None = None) -> Path:
    """Save a matplotlib figure as ``<name>.png`` next to the results JSON."""
    path = results_dir(dataset, profile, root) / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
