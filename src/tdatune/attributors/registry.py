"""Attributors by name."""

from __future__ import annotations

from typing import Any

from tdatune.attributors.base import Attributor
from tdatune.attributors.if_arnoldi import IFArnoldi
from tdatune.attributors.if_cg import IFCG
from tdatune.attributors.if_explicit import IFExplicit
from tdatune.attributors.if_lissa import IFLiSSA
from tdatune.attributors.iffim import IFFIM
from tdatune.attributors.kfac import EKFAC, KFAC
from tdatune.attributors.logra import LoGra
from tdatune.attributors.tracin import TracIn
from tdatune.attributors.trak import TRAK

ATTRIBUTORS: dict[str, type[Attributor]] = {
    cls.name: cls for cls in (IFExplicit, IFCG, IFLiSSA, IFFIM, TRAK, TracIn, LoGra, KFAC, EKFAC,
                IFArnoldi)
}


def make_attributor(name: str, **values: Any) -> Attributor:
    """Build the attributor called ``name`` with fit-stage hyperparameter ``values``."""
    if name not in ATTRIBUTORS:
        raise ValueError(f"unknown attributor {name!r}; choose one of: {', '.join(ATTRIBUTORS)}")
    return ATTRIBUTORS[name](**values)
