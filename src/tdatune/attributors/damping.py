"""Damping with one value per block: what ``score(lam=...)`` accepts from the attributors whose
curvature is block-diagonal (K-FAC and EK-FAC: one block per layer, then one block of the
parameters kept diagonal; LoGra with ``blocks="layer"``).

``lam`` may be

* a number: the same damping added to every eigenvalue;
* a sequence with one number per block, in block order (``path.block_names()``);
* a mapping from block name to number (every block named, or ``"*"`` for the rest);
* ``"per_layer"`` (or ``"per_layer:<fraction>"``): ``fraction`` (default 0.1) x each block's
  mean eigenvalue, Kronfluence's per-module heuristic.

Other per-block rules (a spectrum quantile or xi block by block) need the selection layer:
:func:`tdatune.select.blockwise.block_rule_lambdas` turns them into a sequence for ``score``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

PER_LAYER = "per_layer"
PER_LAYER_FRACTION = 0.1  # Kronfluence's heuristic: 0.1 x each module's mean eigenvalue
REST = "*"

Damping = float | tuple[float, ...] | dict[str, float] | str


def _positive(name: str, x: Any, zero: bool = False) -> float:
    v = float(x)
    if not ((v >= 0 if zero else v > 0) and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number {'>=' if zero else '>'} 0, got {x!r}")
    return v


def per_layer_fraction(rule: str) -> float:
    """The fraction of ``"per_layer"`` / ``"per_layer:<fraction>"``; anything else is refused."""
    head, _, tail = rule.partition(":")
    if head != PER_LAYER:
        raise ValueError(f"unknown damping rule {rule!r}; a per-block rule is 'per_layer' or "
                         "'per_layer:<fraction>' (fraction x each block's mean eigenvalue); give "
                         "numbers per block as a list or a {block name: value} mapping")
    return _positive("the per_layer fraction", tail) if tail else PER_LAYER_FRACTION


def check_damping(x: Any, zero: bool = False) -> Damping:
    """Validate a damping (see the module's docstring): the value in canonical form; ``zero``
    admits 0 (a path's pseudo-inverse, TRAK's default)."""
    if isinstance(x, str):
        per_layer_fraction(x)
        return x
    if isinstance(x, Mapping):
        if not x:
            raise ValueError("the damping mapping is empty; name a block, or '*' for all")
        return {str(k): _positive(f"the damping of block {k!r}", v, zero) for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = float(x)
    if isinstance(x, Sequence | torch.Tensor):
        values = tuple(_positive(f"the damping of block {i}", v, zero) for i, v in enumerate(x))
        if not values:
            raise ValueError("the damping sequence is empty; give one value per block")
        return values
    return _positive("lambda", x, zero)


def block_mean_dampings(sigma: torch.Tensor, sizes: Sequence[int],
                        fraction: float = PER_LAYER_FRACTION) -> list[float]:
    """``fraction`` x the mean eigenvalue of each block (blocks in order, of ``sizes``)."""
    out, start = [], 0
    for size in sizes:
        out.append(fraction * float(sigma[start : start + size].double().mean()))
        start += size
    if start != sigma.numel():
        raise ValueError(f"block sizes add up to {start}, the spectrum has {sigma.numel()}")
    return out


def block_lambdas(damping: Damping, sigma: torch.Tensor, sizes: Sequence[int],
                  names: Sequence[str]) -> float | list[float]:
    """A checked damping (>= 0) as a float (one for all) or a list with one value per block."""
    damping = check_damping(damping, zero=True)
    if isinstance(damping, float):
        return damping
    if isinstance(damping, str):
        return block_mean_dampings(sigma, sizes, per_layer_fraction(damping))
    if isinstance(damping, dict):
        unknown = sorted(set(damping) - set(names) - {REST})
        if unknown:
            raise ValueError(f"no block named {', '.join(unknown)}; the blocks are: "
                             + ", ".join(names))
        missing = [n for n in names if n not in damping]
        if missing and REST not in damping:
            raise ValueError(f"no damping for block(s) {', '.join(missing)}; name every block "
                             "or give '*' for the rest")
        return [damping.get(n, damping.get(REST)) for n in names]  # type: ignore[misc]
    if len(damping) != len(sizes):
        raise ValueError(f"{len(damping)} dampings given for {len(sizes)} blocks ("
                         + ", ".join(names) + ")")
    return list(damping)


__all__ = ["PER_LAYER", "PER_LAYER_FRACTION", "REST", "Damping", "block_lambdas",
           "block_mean_dampings", "check_damping", "per_layer_fraction"]
