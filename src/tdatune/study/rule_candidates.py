"""Candidate damping rules for a per-attributor default, each computable from a stored cell.

Every candidate turns what a sweep cell stores (its validation spectrum statistics, mean-xi
curve, per-block LDS and training recipe) into a lambda, without retraining; its LDS is read
off the cell's 25-point grid by :func:`tdatune.study.rule_compare.cell_gaps`, the same
interpolation in log lambda as every other rule. Two things are counted, never hidden:

- **clamped**: the rule's lambda lies outside the cell's grid (or is 0); it is moved to the
  grid's nearest end, where the grid's LDS is read. It counts as clamped when it lay more than
  ``CLAMP_DECADES`` outside (a grid is placed from the test spectrum's top eigenvalue, a rule
  from the validation spectrum's, so ``1e-12 x top`` lands a few percent below a grid that
  starts at 1e-12 x top).
- **fell back**: the cell does not store what the rule needs (older cells have no spectrum
  statistics); the cell gets the global default, the spectrum's 0.9 quantile, so that every
  candidate is scored on the same cells.

The **training-recipe rule** is a crude hypothesis being tested, not a derivation: it guesses
that training itself damps the directions it had too few steps to resolve, and sets
``lambda_train = weight_decay + (1 - momentum) / (lr x steps)`` for SGD (``steps = epochs x
ceil(n_train / batch_size)``), ``weight_decay`` for L-BFGS, and ``sqrt(mean eigenvalue /
batch_size) / (lr x steps) + weight_decay`` for Adam and AdamW (a guess at Adam's effective
step size). Nothing in the derivation of the selection supports these formulas; the study
measures whether they happen to land near the best lambda.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tdatune.study.rule_compare import (
    Cell,
    Rule,
    best_lds,
    cell_gaps,
    grid_of,
    mean_rule,
    quantile_rule,
    top_rule,
    xi_rule,
)

DEFAULT_QUANTILE = 0.9
QUANTILES = (0.5, 0.7, 0.8, 0.9, 0.95)
TOP_FACTORS = tuple(10.0 ** (e / 2) for e in range(-2, -25, -1))   # 1e-1 ... 1e-12, largest first
MEAN_FACTORS = tuple(10.0 ** (e / 2) for e in range(2, -13, -1))   # 10 ... 1e-6, largest first
XI_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)                          # the thresholds cells store
BLOCK_FRACTION = 0.1  # what the cells' stored per-block heuristic used: 0.1 x each block's mean
CLAMP_DECADES = 0.05  # outside the grid by more than this (in log10 lambda) counts as clamped
KINDS = {"iffim": "eigen-kernel", "trak": "eigen-kernel", "logra": "eigen-kernel",
         "if_explicit": "eigen-kernel", "kfac": "Kronecker", "ekfac": "Kronecker",
         "if_arnoldi": "truncated"}
ATTRIBUTOR_NAMES = {"iffim": "IFFIM", "trak": "TRAK", "logra": "LoGra",
                    "logra-layer": "LoGra per layer", "ekfac": "EK-FAC", "kfac": "K-FAC",
                    "if_arnoldi": "Arnoldi", "if_explicit": "IF explicit"}


@dataclass(frozen=True)
class Candidate:
    """One rule with its constant (``family``: quantile, top, mean, xi, per_layer or recipe):
    ``lam`` gives the cell's lambda (None: not stored); ``stored_lds``, where set and not None
    for a cell, is the LDS the rule reached directly (per-block damping, which one lambda on the
    grid cannot represent)."""

    family: str
    constant: float | None
    lam: Rule
    stored_lds: Callable[[Cell], float | None] | None = None

    @property
    def label(self) -> str:
        """How the report names the rule."""
        if self.constant is None:
            return "training recipe" if self.family == "recipe" else self.family
        pattern = {"quantile": "q = {:g}", "top": "{:.3g} x top", "mean": "{:.3g} x mean",
                   "xi": "xi >= {:g}", "per_layer": "per block {:g} x block mean"}[self.family]
        return pattern.format(self.constant)


def attributor_of(cell: Cell) -> str:
    """The attributor a cell ran, with LoGra with one block per layer told apart."""
    name = str(cell.get("attributor") or cell.get("definition", {}).get("attributor"))
    fit = cell.get("fit") or cell.get("definition", {}).get("fit") or {}
    return f"{name}-layer" if name == "logra" and fit.get("blocks") == "layer" else name


def kind_of(cell: Cell) -> str:
    """The attributor's family of curvature: eigen-kernel, Kronecker or truncated."""
    return KINDS.get(str(cell.get("attributor")), "other")


def training_steps(recipe: dict, n_train: int) -> int:
    """Optimizer steps of a recipe: epochs x ceil(n_train / batch_size)."""
    return int(recipe["epochs"]) * math.ceil(n_train / int(recipe["batch_size"]))


def recipe_rule(cell: Cell) -> float | None:
    """The training-recipe lambda (a crude hypothesis under test; see the module docstring).
    None for an optimizer it has no formula for, Adam without a stored mean eigenvalue, or a
    training function of the user's own (its recipe holds no learning rate or steps)."""
    setting = cell.get("definition", {}).get("setting", {})
    recipe, sizes = setting.get("recipe"), setting.get("sizes")
    if not recipe or not sizes:
        return None
    optimizer = str(recipe.get("optimizer", "")).lower()
    wd = float(recipe.get("weight_decay") or 0.0)
    if optimizer == "lbfgs":
        return wd
    if not all(k in recipe for k in ("lr", "epochs", "batch_size")):
        return None
    lr_steps = float(recipe["lr"]) * training_steps(recipe, int(sizes[0]))
    if optimizer == "sgd":
        return wd + (1.0 - float(recipe.get("momentum") or 0.0)) / lr_steps
    mean = (cell.get("spectrum_stats") or {}).get("mean")
    if optimizer in ("adam", "adamw") and mean is not None:
        return wd + math.sqrt(float(mean) / int(recipe["batch_size"])) / lr_steps
    return None


def block_heuristic_lds(cell: Cell) -> float | None:
    """The LDS a cell stored with one damping per block by Kronfluence's heuristic."""
    block = (cell.get("blockwise") or {}).get("heuristic")
    return None if not block else float(block["lds"])


def single_block_heuristic(cell: Cell) -> float | None:
    """The per-block heuristic where the cell has one block (no per-block LDS stored, no
    error): 0.1 x the whole spectrum's mean; None where several blocks failed to store."""
    return None if "blockwise_error" in cell else mean_rule(BLOCK_FRACTION)(cell)


def default_candidates() -> list[Candidate]:
    """Every candidate, the global default first: ties in a choice go to the one listed
    first (of equal factors, the largest, least dependent on where a grid ends)."""
    out = [Candidate("quantile", DEFAULT_QUANTILE, quantile_rule(DEFAULT_QUANTILE))]
    out += [Candidate("quantile", q, quantile_rule(q)) for q in QUANTILES if q != DEFAULT_QUANTILE]
    out += [Candidate("top", c, top_rule(c)) for c in TOP_FACTORS]
    out += [Candidate("mean", c, mean_rule(c)) for c in MEAN_FACTORS]
    out += [Candidate("xi", t, xi_rule(t)) for t in XI_THRESHOLDS]
    out += [Candidate("per_layer", BLOCK_FRACTION, single_block_heuristic, block_heuristic_lds),
            Candidate("recipe", None, recipe_rule)]
    return out


def on_grid(cell: Cell, lam: float) -> tuple[float, bool]:
    """``lam`` moved into the cell's grid (0 or less: the grid's first point) and whether it
    had to be moved."""
    grid = grid_of(cell)[0]
    inside = float(np.clip(lam, grid[0], grid[-1])) if lam > 0 else float(grid[0])
    return inside, lam <= 0 or abs(math.log10(inside / lam)) > CLAMP_DECADES


@dataclass
class CandidateGaps:
    """Gaps to the grid best of every candidate on every cell, [candidate, cell], with where a
    rule's lambda was clamped to the grid and where the cell fell back to the default."""

    candidates: list[Candidate]
    gaps: np.ndarray
    clamped: np.ndarray
    fallback: np.ndarray


def candidate_gaps(cells: list[Cell], candidate: Candidate) -> tuple[np.ndarray, np.ndarray,
                                                                     np.ndarray]:
    """One candidate's gaps, clamped and fallback flags over ``cells``."""
    fallback_rule = quantile_rule(DEFAULT_QUANTILE)
    lams, clamped, fell = {}, np.zeros(len(cells), bool), np.zeros(len(cells), bool)
    stored = np.full(len(cells), math.nan)
    for i, cell in enumerate(cells):
        direct = candidate.stored_lds(cell) if candidate.stored_lds else None
        if direct is not None:
            stored[i] = best_lds(cell) - direct
            continue
        lam = candidate.lam(cell)
        if lam is None or not math.isfinite(lam):
            lam, fell[i] = fallback_rule(cell), True
        if lam is not None:
            lams[id(cell)], clamped[i] = on_grid(cell, lam)
    gaps = cell_gaps(cells, lambda cell: lams.get(id(cell)))
    has_stored = np.isfinite(stored)
    gaps[has_stored] = stored[has_stored]
    return gaps, clamped, fell


def score_candidates(cells: list[Cell], candidates: list[Candidate] | None = None) -> CandidateGaps:
    """Every candidate (default: :func:`default_candidates`) scored on every cell. The first
    candidate is the global default the report compares every choice with."""
    candidates = default_candidates() if candidates is None else candidates
    parts = [candidate_gaps(cells, c) for c in candidates]
    return CandidateGaps(candidates, *(np.stack([p[k] for p in parts]) for k in range(3)))
