"""Retraining-free rules applied block by block: one damping per layer of a block-diagonal
curvature (K-FAC, EK-FAC, LoGra with one block per layer), each read off that block's own
validation spectrum.

``rule`` is ``"per_layer"`` (``fraction`` x the block's mean eigenvalue, Kronfluence's
heuristic; ``"per_layer:0.05"`` for another fraction) or ``"blockwise:<rule>"`` with ``<rule>``
one of :data:`tdatune.select.default.RULES` (``"blockwise:quantile"``: each block's 0.9
spectrum quantile; ``"blockwise:xi"``: Algorithm 1 on each block's eigenvalues and validation
coordinates; ``"blockwise:top"``: 0.01 x each block's largest eigenvalue).
"""

from __future__ import annotations

from tdatune.attributors.damping import PER_LAYER, block_mean_dampings, per_layer_fraction
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.select.default import RULES, choose_lambda

BLOCKWISE = "blockwise:"


def is_block_rule(rule: str) -> bool:
    """True for the rules that give one damping per block."""
    return rule.split(":")[0] == PER_LAYER or rule.startswith(BLOCKWISE)


def block_rule_lambdas(val_path: LambdaPath, rule: str, *, threshold: float = 0.5) -> list[float]:
    """One damping per block of ``val_path`` (validation explained set) by ``rule``, in
    ``val_path.block_names()`` order."""
    sizes = val_path.block_sizes()
    if rule.split(":")[0] == PER_LAYER:  # the raw spectrum, as score(lam="per_layer") reads it
        return block_mean_dampings(val_path.sigma, sizes, per_layer_fraction(rule))
    if not rule.startswith(BLOCKWISE) or rule[len(BLOCKWISE):] not in RULES:
        raise ValueError(f"unknown per-block rule {rule!r}; use 'per_layer', 'per_layer:<fraction>' "
                         "or " + ", ".join(f"'{BLOCKWISE}{r}'" for r in RULES))
    inner = rule[len(BLOCKWISE):]
    sigma, coords = val_path.spectrum()
    out, start = [], 0
    for size in sizes:
        part = slice(start, start + size)
        out.append(choose_lambda(sigma[part], coords[:, part], rule=inner, threshold=threshold).lam)
        start += size
    return out


__all__ = ["BLOCKWISE", "block_rule_lambdas", "is_block_rule"]
