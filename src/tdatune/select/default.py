"""The lambda tdatune uses when none is given: a retraining-free rule, chosen per attributor.

Rules on one spectrum:

- ``"xi"``: Algorithm 1, the smallest lambda where the validation mean of xi reaches the
  threshold (``select_lambda``);
- ``"top"`` (``"top:<c>"``): ``c`` x the largest eigenvalue of the validation spectrum (default
  ``TOP_FRACTION``);
- ``"quantile"`` (``"quantile:<q>"``): the ``q`` quantile of the non-zero eigenvalues (default
  ``QUANTILE``).

Rules with one damping per block (K-FAC, EK-FAC, LoGra per layer) are in
:mod:`tdatune.select.blockwise` (``"per_layer"``, ``"blockwise:<rule>"``).

Which rule is the default is decided per attributor (:func:`default_rule`), out of sample:
``tdatune rules`` chooses, for each attributor and each held-out setting, the rule that did
best on the other settings, and a rule replaces the global 0.9 quantile only where it beat it
out of sample in mean and worst gap on at least three settings (``docs/study.md``, "The
default per attributor, chosen out of sample"; 180 cells, 8 settings). K-FAC and EK-FAC take
Kronfluence's 0.1 x mean eigenvalue per layer (a constant of the literature, not fitted here),
lowered to one smaller damping when a reference attributor's predictions agree best there
(``"agree"``, :mod:`tdatune.select.agreement`: chosen on seed 0 of the study settings, judged
on seeds 1 and 2 and on three new families), Arnoldi's truncated spectrum 0.001 x its top
eigenvalue, LoGra with one block per layer the 0.7 quantile of its whole spectrum, and every
other attributor the 0.9 quantile. Whatever the rule, the returned ``Selection`` keeps
Algorithm 1's curve, its lambda (``xi_lambda``) and its reliability signals, whose
``distance`` is the disagreement of xi and the quantile.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from tdatune.select.quantile import quantile_lambda
from tdatune.select.surrogate import Selection, select_lambda
from tdatune.utils.checks import check_choice, check_open_unit

RULES = ("xi", "top", "quantile")
DEFAULT_RULE = "quantile"  # attributors without an entry in ATTRIBUTOR_DEFAULTS
QUANTILE = 0.9
TOP_FRACTION = 0.01
# The default rule per attributor ("logra:layer": LoGra with blocks="layer"); see the docstring.
ATTRIBUTOR_DEFAULTS = {"kfac": "agree", "ekfac": "agree", "if_arnoldi": "top:0.001",
                       "logra:layer": "quantile:0.7"}


def default_rule(attributor: str, params: dict[str, Any] | None = None) -> str:
    """The default selection rule of ``attributor`` built with ``params``."""
    key = attributor
    if attributor == "logra" and (params or {}).get("blocks") == "layer":
        key = "logra:layer"
    return ATTRIBUTOR_DEFAULTS.get(key, DEFAULT_RULE)


def parse_rule(rule: str) -> tuple[str, float | None]:
    """``"quantile:0.7"`` -> ("quantile", 0.7); ``"xi"`` -> ("xi", None); checked."""
    name, _, constant = rule.partition(":")
    check_choice("selection rule", name, RULES)
    if not constant:
        return name, None
    if name == "xi":
        raise ValueError("the xi rule takes its threshold from threshold=, not 'xi:<t>'")
    value = float(constant)
    if name == "quantile":
        check_open_unit("the quantile of 'quantile:<q>'", value)
    elif not (value > 0 and math.isfinite(value)):
        raise ValueError(f"the fraction of 'top:<c>' must be a finite number > 0, got {constant}")
    return name, value


def choose_lambda(sigma: torch.Tensor, c_val: torch.Tensor, *, rule: str = DEFAULT_RULE,
                  threshold: float = 0.5, grid: torch.Tensor | None = None,
                  rank: int | None = None) -> Selection:
    """The lambda of ``rule`` (one of ``RULES``, with its constant: ``"top:0.001"``,
    ``"quantile:0.7"``) with Algorithm 1's diagnostics; ``rank``: the whole spectrum's size
    when ``sigma`` holds only its top eigenvalues (:func:`quantile_lambda`)."""
    name, constant = parse_rule(rule)
    selection = select_lambda(sigma, c_val, threshold=threshold, grid=grid)
    if name == "xi":
        return selection
    if name == "top":
        c = TOP_FRACTION if constant is None else constant
        lam = c * float(torch.as_tensor(sigma, dtype=torch.float64).max())
    else:
        lam = quantile_lambda(sigma, QUANTILE if constant is None else constant, rank=rank)
    return replace(selection, lam=lam, status="spectrum", rule=rule, xi_lambda=selection.lam)
