"""Attributors by name."""

from __future__ import annotations

from typing import Any

from tdatune.attributors.base import Attributor
from tdatune.attributors.iffim import IFFIM

ATTRIBUTORS: dict[str, type[Attributor]] = {cls.name: cls for cls in (IFFIM,)}


def make_attributor(name: str, **values: Any) -> Attributor:
    """Build the attributor called ``name`` with fit-stage hyperparameter ``values``."""
    if name not in ATTRIBUTORS:
        raise ValueError(f"unknown attributor {name!r}; choose one of: {', '.join(ATTRIBUTORS)}")
    return ATTRIBUTORS[name](**values)
