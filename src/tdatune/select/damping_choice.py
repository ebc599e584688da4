"""The damping an attributor uses when none is given: its default rule (or the one asked for),
one lambda or one per block, with Algorithm 1's diagnostics beside it.

``"agree"`` (K-FAC's and EK-FAC's default) is the per-layer damping lowered toward a reference
attributor's agreement (:mod:`tdatune.select.agreement`); it fits the reference (IFFIM) on the
attributor's own training context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tdatune.attributors.base import Attributor
from tdatune.attributors.registry import make_attributor
from tdatune.data.base import ArrayDataset
from tdatune.select.agreement import AGREE, REFERENCE, Agreement, agreement_damping
from tdatune.select.blockwise import PER_LAYER, block_rule_lambdas, is_block_rule
from tdatune.select.default import choose_lambda, default_rule
from tdatune.select.surrogate import Selection


@dataclass
class DampingChoice:
    """What :func:`choose_damping` picked: the ``rule``, the damping ``lam`` (a float, or one
    value per block named in ``block_names``) and ``selection``: Algorithm 1's curve, xi's
    lambda and the reliability signals (for a per-block rule, those of the whole spectrum)."""

    rule: str
    lam: float | list[float]
    selection: Selection
    block_names: list[str] | None = None
    agreement: Agreement | None = None

    @property
    def per_block(self) -> bool:
        """True when ``lam`` holds one damping per block."""
        return isinstance(self.lam, list)

    def by_block(self) -> dict[str, float] | None:
        """``{block name: damping}`` for a per-block choice (None otherwise)."""
        if not isinstance(self.lam, list) or self.block_names is None:
            return None
        return dict(zip(self.block_names, self.lam, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: rule, lambda (or per-block lambdas by name), xi's lambda, status."""
        out: dict[str, Any] = {"rule": self.rule, "lambda": self.lam,
                               "xi_lambda": self.selection.xi_lambda
                               if self.selection.xi_lambda is not None else self.selection.lam,
                               "status": self.selection.status}
        if self.per_block:
            out["blocks"] = self.by_block()
        if self.agreement is not None:
            out["agreement"] = self.agreement.to_dict()
        return out

    def describe(self) -> str:
        """One line: ``per_layer: 4 blocks, 1.2e-05 .. 3.4e-02`` or ``quantile: 7.8e-04``."""
        if isinstance(self.lam, list):
            return (f"{self.rule}: {len(self.lam)} blocks, {min(self.lam):.3g} .. "
                    f"{max(self.lam):.3g}")
        return f"{self.rule}: {self.lam:.4g}"


def choose_damping(att: Attributor, val: ArrayDataset, *, rule: str | None = None,
                   threshold: float = 0.5, grid: torch.Tensor | None = None,
                   reference: Attributor | None = None) -> DampingChoice:
    """The damping of ``rule`` (default: the attributor's own, :func:`default_rule`) on the
    validation set ``val`` of a fitted eigen-based attributor, without retraining; ``grid``:
    Algorithm 1's scan grid (default :func:`tdatune.select.surrogate.select_lambda`'s);
    ``reference``: the fitted reference of ``"agree"`` (default: IFFIM, fitted here)."""
    rule = default_rule(att.name, att.params) if rule is None else rule
    sigma, c_val = att.surrogate_spectrum(val)
    if rule == AGREE:
        path = att.lambda_path(val)  # type: ignore[attr-defined]  (fitted: it has a context)
        if reference is None:
            assert att.context is not None
            reference = make_attributor(REFERENCE).fit(att.context)
        ref_lam = choose_damping(reference, val).lam
        if isinstance(ref_lam, list):
            raise ValueError("the reference attributor must take one damping, not one per block")
        agreement = agreement_damping(
            path, reference.lambda_path(val), float(ref_lam),  # type: ignore[attr-defined]
            block_rule_lambdas(path, PER_LAYER, threshold=threshold))
        selection = choose_lambda(sigma, c_val, threshold=threshold, grid=grid)
        lam = agreement.lam
        return DampingChoice(rule, lam, selection,
                             path.block_names() if isinstance(lam, list) else None, agreement)
    if is_block_rule(rule):
        path = att.lambda_path(val)  # type: ignore[attr-defined]
        lams = block_rule_lambdas(path, rule, threshold=threshold)
        selection = choose_lambda(sigma, c_val, threshold=threshold, grid=grid)
        return DampingChoice(rule, lams, selection, path.block_names())
    path = att.lambda_path(val) if hasattr(att, "lambda_path") else None
    selection = choose_lambda(sigma, c_val, rule=rule, threshold=threshold, grid=grid,
                              rank=getattr(path, "full_rank", None))
    return DampingChoice(rule, selection.lam, selection)


__all__ = ["DampingChoice", "choose_damping"]
