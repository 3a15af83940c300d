"""Unlearning methods by name: one module per method, one line each in :data:`REGISTRY`.

    from vdu.methods import get_method
    get_method("salun").Config()          # its hyperparameters, a comment per field in the module

Adding a method: write ``vdu/methods/<name>.py`` with a ``Method`` subclass (``name``, ``Config``,
``needs``, ``loss``; see :mod:`vdu.methods.base`) and add it below; the contract test in
``tests/test_methods.py`` runs it on tiny models automatically.
"""
from __future__ import annotations

from .amnesia import Amnesia
from .base import NEEDS, Batch, Method
from .erasediff import EraseDiff
from .esd import ESD
from .finetune import Finetune
from .fu import FU
from .lu import LU
from .neggrad import NegGrad
from .ru import RU
from .salun import SalUn
from .siss import SISS
from .vdu import VDU

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (VDU, NegGrad, Finetune, Amnesia, SalUn, EraseDiff, SISS, ESD, RU, LU, FU)}


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; an unknown name raises and lists the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown unlearning method {name!r}; known methods: {sorted(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["NEEDS", "REGISTRY", "Batch", "Method", "get_method"]
