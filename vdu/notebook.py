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
