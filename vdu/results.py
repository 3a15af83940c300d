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


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (what a cached row's model or evaluator was)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: str | os.PathLike) -> str:
    """SHA-256 of what a model folder computes with: every file's relative path and bytes (weights, configs),
    except its card, logs and pictures (``card.json``, ``unlearn.json``, ``*.png``, ``*.md``)."""
    import hashlib
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        if f.name in ("card.json", "unlearn.json") or f.suffix in (".png", ".md"):
            continue
        h.update(str(f.relative_to(folder)).encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


# the modules a table row of the class-unlearning notebooks is computed by: their sources are part of a row's key
ROW_CODE = ("vdu/methods", "vdu/unlearning.py", "vdu/evaluation.py", "vdu/diffusion.py", "vdu/metrics.py",
            "vdu/experiments.py", "vdu/models.py", "vdu/evaluator.py", "vdu/data.py", "vdu/posterior.py",
            "vdu/primal_dual.py")


def source_digest(paths=ROW_CODE, root: str | os.PathLike | None = None) -> str:
    """SHA-256 of the Python sources under ``paths`` (files or folders, relative to the repository)."""
    import hashlib
    root = Path(root) if root else REPO
    h = hashlib.sha256()
    for p in paths:
        files = sorted((root / p).rglob("*.py")) if (root / p).is_dir() else [root / p]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


class RowCache:
    """Rows of a long notebook run on disk, so that an interrupted run (or one continued in another session)
    does not redo them: one ``<key>.json`` per row (and ``<key>.pt`` for tensors that go with it, e.g. a sample
    grid), written atomically, where the key is the SHA-256 of ``context`` (what the whole run depends on: the
    weights' digests, the evaluation, the data) and the row's ``spec`` (its method, options, class ...).

    Put the code in the context too (:func:`source_digest`): a row computed before a change of a method, the
    loop or the evaluation is then recomputed, never reused. Each row records the machine and the commit
    that computed it. ``folder=None`` turns the cache off."""

    def __init__(self, folder: str | os.PathLike | None, **context):
        self.folder = Path(folder) if folder else None
        self.context = context
        self.hits = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def key(self, **spec) -> str:
        import hashlib
        text = json.dumps({"context": self.context, "spec": spec}, sort_keys=True, default=_jsonable)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def get(self, with_tensor: bool = False, **spec) -> tuple[dict, torch.Tensor | None] | None:
        """The row of ``spec`` and its tensor (or None), or None when it was not computed yet. A damaged file,
        or (``with_tensor``) a missing or unreadable tensor, counts as not computed: the row is redone."""
        if self.folder is None:
            return None
        k = self.key(**spec)
        path = self.folder / f"{k}.json"
        if not path.exists():
            return None
        try:
            row = json.loads(path.read_text())["row"]
        except (ValueError, KeyError):
            return None
        t, tensor = self.folder / f"{k}.pt", None
        if t.exists():
            try:
                tensor = torch.load(t)
            except Exception:       # noqa: BLE001 (any unreadable file: recompute)
                tensor = None
        if with_tensor and tensor is None:
            return None
        self.hits += 1
        return row, tensor

    def row(self, compute, **spec) -> dict:
        """The row of ``spec`` from disk, or ``compute()``'s row, stored for the next run."""
        hit = self.get(**spec)
        if hit is not None:
            return hit[0]
        row = compute()
        self.put(row, **spec)
        return row

    def put(self, row: dict, tensor: torch.Tensor | None = None, **spec) -> None:
        if self.folder is None:
            return
        k = self.key(**spec)
        if tensor is not None:                 # the tensor first: a row on disk always has its tensor
            tmp = self.folder / f".{k}.pt.tmp"
            torch.save(tensor.detach().cpu(), tmp)
            os.replace(tmp, self.folder / f"{k}.pt")
        tmp = self.folder / f".{k}.json.tmp"
        tmp.write_text(json.dumps({"spec": spec, "commit": _commit(), "machine": machine(),
                                   "written": time.strftime("%Y-%m-%d %H:%M:%S"), "row": row}, indent=1,
                                  default=_jsonable))
        os.replace(tmp, self.folder / f"{k}.json")


def _jsonable(o):
    """JSON for what rows and specs hold besides plain values: dataclasses (configs), tensors, numpy numbers."""
    import dataclasses
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def _commit() -> str | None:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
