"""Checks for a notebook's papermill parameters, run first so that a typo or a wrong type fails in the
first cell, not after an hour of work (``papermill -p n_forget abc`` passes the string "abc")."""
from __future__ import annotations


def check_params(spec: dict) -> None:
    """``spec``: name -> (value, type, minimum or None). Raises a ValueError naming every bad parameter."""
    bad = []
    for name, (value, typ, low) in spec.items():
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
            bad.append(f"{name}={value!r} must be {typ.__name__}")
        elif low is not None and value < low:
            bad.append(f"{name}={value!r} must be >= {low}")
    if bad:
        raise ValueError("bad notebook parameters: " + "; ".join(bad) + " (papermill -p NAME VALUE)")


def check_options(configs: dict, method: str) -> None:
    """Every named config of ``configs`` (name -> unlearn options) must consist of options of the loop or of
    ``method``: a typo fails in the first cell, naming the config and the option."""
    from .unlearning import split_options
    for name, options in configs.items():
        try:
            split_options(method, options)
        except TypeError as e:
            raise ValueError(f"config {name!r}: {e}") from None


# the notebooks `make run-all` runs for each dataset, in reading order (each with notebooks/params/<nb>-full.yaml)
MATRIX = {"mnist": ["pretrain", "vdu_unlearning", "benchmark", "constrained_unlearning", "data_unlearning",
                    "evaluation", "posteriors"],
          "gmm": ["duality"],
          "cifar10": ["pretrain", "benchmark"], "tinyimagenet": ["pretrain", "benchmark"]}


def finished(path) -> bool:
    """Whether ``path`` is a completed full-profile papermill run (end time set, no exception)."""
    import json
    from pathlib import Path
    path = Path(path)
    if not path.exists():
        return False
    try:
        meta = json.loads(path.read_text())["metadata"].get("papermill", {})
    except (ValueError, KeyError):
        return False
    return bool(meta.get("end_time")) and not meta.get("exception") and \
        meta.get("parameters", {}).get("profile") == "full"


def compact_figures(path, colors: int = 256) -> int:
    """Re-encode the PNG figures of the executed notebook at ``path`` as ``colors``-colour palette PNGs, where
    that is smaller, and return the bytes saved. The executed notebooks are what the site shows; the lossless
    figures are the files each notebook saves under ``results/``. A figure already in palette mode is left as
    it is, so compacting twice changes nothing."""
    import base64
    import io
    import os
    from pathlib import Path

    import nbformat
    from PIL import Image
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    saved = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" not in data:
                continue
            raw = base64.b64decode(data["image/png"])
            im = Image.open(io.BytesIO(raw))
            if im.mode == "P":
                continue
            buf = io.BytesIO()
            im.convert("RGB").quantize(colors, method=Image.Quantize.MEDIANCUT).save(buf, "PNG", optimize=True)
            if buf.tell() < len(raw):
                data["image/png"] = base64.b64encode(buf.getvalue()).decode()
                saved += len(raw) - buf.tell()
    nb.metadata["vdu"] = {"figures": f"{colors}-colour palette PNGs; the lossless figures are under results/"}
    tmp = path.with_name(f".{path.name}.compact")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)
    return saved


class NoGPUError(RuntimeError):
    """The GPU profile was asked for on a machine where torch sees no CUDA device."""


def run_all(datasets=None, notebooks=None, force: bool = False, root=None, out=None, dry_run: bool = False,
            log=print, gpu: bool = False) -> list[dict]:
    """Run the full profile of every (notebook, dataset) of :data:`MATRIX` with papermill, in order, writing
    ``docs/executed/<notebook>-<dataset>.ipynb``. A cell already finished is skipped (``force`` redoes it), so
    an interrupted ``make run-all`` resumes where it stopped; a run writes to a temporary file first and a
    failed one is kept as ``<notebook>-<dataset>.failed.ipynb``. ``datasets`` / ``notebooks`` select.

    ``gpu``: the GPU profile — ``params/<notebook>-gpu.yaml``, where a notebook has one, overrides its full
    profile (device cuda, bfloat16 autocast, more samples); refused on a machine without CUDA."""
    import os
    import time
    from pathlib import Path
    root = Path(root) if root else Path(__file__).resolve().parents[1]
    out = Path(out) if out else root / "docs" / "executed"
    datasets = list(datasets or ["mnist", "gmm"])
    unknown = [d for d in datasets if d not in MATRIX]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; known: {sorted(MATRIX)}")
    wanted = set(notebooks) if notebooks else None
    known = {nb for nbs in MATRIX.values() for nb in nbs}
    if wanted and wanted - known:
        raise ValueError(f"unknown notebook(s) {sorted(wanted - known)}; known: {sorted(known)}")
    if gpu and not dry_run:
        import torch
        if not torch.cuda.is_available():
            raise NoGPUError("the GPU profile (--gpu) runs the notebooks on device cuda, and torch sees no CUDA "
                               "device here: run the full profile without --gpu, or on a machine with a GPU")
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for ds in datasets:
        for nb in MATRIX[ds]:
            if wanted and nb not in wanted:
                continue
            target = out / f"{nb}-{ds}.ipynb"
            row = {"notebook": nb, "dataset": ds, "output": str(target)}
            if finished(target) and not force:
                log(f"{nb} [{ds}]: finished earlier, skipped ({target.name}; --force to redo)")
                done.append({**row, "status": "skipped"})
                continue
            profile = "GPU profile" if gpu and _gpu_params(root, nb) else "full profile"
            if dry_run:
                log(f"{nb} [{ds}]: would run the {profile} -> {target.name}")
                done.append({**row, "status": "would run"})
                continue
            log(f"{nb} [{ds}]: running the {profile} -> {target.name}")
            import papermill as pm
            tmp = target.with_name(f".{target.stem}.running.ipynb")
            t0 = time.time()
            try:
                pm.execute_notebook(str(root / "notebooks" / f"{nb}.ipynb"), str(tmp),
                                    parameters=_full_params(root, nb, ds, gpu), cwd=str(root / "notebooks"),
                                    progress_bar=True)
            except BaseException:
                if tmp.exists():
                    os.replace(tmp, target.with_name(f"{nb}-{ds}.failed.ipynb"))
                raise
            compact_figures(tmp)        # the site's copy; the lossless figures are in results/
            os.replace(tmp, target)
            target.with_name(f"{nb}-{ds}.failed.ipynb").unlink(missing_ok=True)   # an earlier failure is history
            done.append({**row, "status": "ran", "wall_s": round(time.time() - t0, 1)})
    return done


def _full_params(root, nb: str, ds: str, gpu: bool = False) -> dict:
    """The parameters papermill gives ``nb`` on dataset ``ds``: ``params/<nb>-full.yaml``, then the dataset's
    block ``params/<nb>-<ds>.yaml`` where there is one (its top-level keys replace the full profile's), then
    the GPU profile's overrides when ``gpu``."""
    import yaml
    path = root / "notebooks" / "params" / f"{nb}-full.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: every notebook of the matrix needs its full profile")
    return {**(yaml.safe_load(path.read_text()) or {}), **_dataset_params(root, nb, ds),
            **(_gpu_params(root, nb) if gpu else {}), "dataset": ds}


def _dataset_params(root, nb: str, ds: str) -> dict:
    """``params/<nb>-<ds>.yaml``: what the full profile of ``nb`` changes on dataset ``ds`` ({} where nothing)."""
    import yaml
    path = root / "notebooks" / "params" / f"{nb}-{ds}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _gpu_params(root, nb: str) -> dict:
    """The GPU profile's overrides of ``nb``'s full profile (``params/<nb>-gpu.yaml``; {} where there is none)."""
    import yaml
    path = root / "notebooks" / "params" / f"{nb}-gpu.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
