"""Does the reliability signal flag the cells where the default loses? (the section "Reliability
of the default" of ``rules.md`` and its CSV).

Every cell's gap to the grid best is taken under its attributor's default
(:func:`tdatune.study.rule_choice.recommend`, the same rule on every cell, as it ships) and under
the old global default, the spectrum's 0.9 quantile; a cell *loses* when the gap exceeds
``LOSS_MARGIN``. Two retraining-free signals are judged against those losses:

- ``stored``: the ``unsure`` a cell stores with its selection at threshold 0.5
  (:mod:`tdatune.select.reliability`: xi's lambda and the spectrum's 0.9 quantile more than
  ``DISTANCE_MAX`` decade apart). Older cells stored no reliability block; theirs is recomputed
  from the lambdas they store, which gives the stored verdict on every cell that has both.
- ``to default``: the same test with the default's own lambda in place of the 0.9 quantile: xi's
  lambda at 0.5 against the rule's lambda on the cell (the 0.9 quantile where the cell lacks what
  the rule needs, as when it is scored). For one damping per block (stored per block with the
  blocks' own xi lambdas at 0.5), the median over blocks of each block's distance. Where the
  default is the 0.9 quantile the two signals are one.

A useful signal flags many of the losing cells and few of the others.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from tdatune.select.reliability import DISTANCE_MAX, REFERENCE_QUANTILE
from tdatune.study.rule_candidates import (
    ATTRIBUTOR_NAMES,
    DEFAULT_QUANTILE,
    Candidate,
    attributor_of,
    candidate_gaps,
)
from tdatune.study.rule_compare import Cell, quantile_rule, seed_of, setting_key, xi_rule

LOSS_MARGIN = 0.03  # a cell whose gap exceeds this loses
THRESHOLD = 0.5     # the selection whose signal is judged (the product's default threshold)


def decades(a: float | None, b: float | None) -> float:
    """|log10(a / b)|; NaN unless both are positive."""
    ok = a is not None and b is not None and a > 0 and b > 0
    return abs(math.log10(a / b)) if ok else math.nan  # type: ignore[operator]


def stored_unsure(cell: Cell, threshold: float = THRESHOLD) -> float:
    """The ``unsure`` the cell stores at ``threshold`` (1.0 / 0.0), recomputed from its stored
    lambdas where it stored none; NaN where it has neither."""
    sel = next((s for s in cell.get("selections", []) if math.isclose(s["threshold"], threshold)),
               None)
    stored = (sel or {}).get("reliability")
    if stored is not None:
        return float(bool(stored["unsure"]))
    return _beyond(decades(xi_rule(threshold)(cell), quantile_rule(REFERENCE_QUANTILE)(cell)))


def default_distance(cell: Cell, default: Candidate, threshold: float = THRESHOLD) -> float:
    """Decades between xi's lambda at ``threshold`` and the default's lambda on the cell (per
    block: the median over blocks, each block's xi lambda against its damping)."""
    block = cell.get("blockwise") or {}
    own = (block.get("heuristic") or {}).get("lambdas")
    xi = (block.get("xi") or {}).get("lambdas")
    if default.family == "per_layer" and own and xi:
        with np.errstate(invalid="ignore"):
            return float(np.nanmedian([decades(x, h) for x, h in zip(xi, own, strict=True)]))
    lam = default.lam(cell)
    if lam is None or not math.isfinite(lam):
        lam = quantile_rule(DEFAULT_QUANTILE)(cell)
    return decades(xi_rule(threshold)(cell), lam)


def _beyond(distance: float) -> float:
    """1.0 / 0.0 for a distance beyond / within ``DISTANCE_MAX``; NaN stays NaN."""
    return math.nan if math.isnan(distance) else float(distance > DISTANCE_MAX)


@dataclass
class FlagCounts:
    """Cells judged, cells whose gap exceeds the margin, flagged among them and among the rest."""

    cells: int
    losing: int
    flagged_losing: int
    flagged_rest: int

    def __add__(self, other: FlagCounts) -> FlagCounts:
        return FlagCounts(self.cells + other.cells, self.losing + other.losing,
                          self.flagged_losing + other.flagged_losing,
                          self.flagged_rest + other.flagged_rest)


def flag_counts(gaps: np.ndarray, flags: np.ndarray, margin: float = LOSS_MARGIN) -> FlagCounts:
    """Counts over the cells where both the gap and the flag (1.0 / 0.0) are known."""
    gaps, flags = np.asarray(gaps, dtype=np.float64), np.asarray(flags, dtype=np.float64)
    ok = np.isfinite(gaps) & np.isfinite(flags)
    losing, flagged = ok & (gaps > margin), ok & (flags == 1.0)
    return FlagCounts(int(ok.sum()), int(losing.sum()), int((flagged & losing).sum()),
                      int((flagged & ok & ~losing).sum()))


@dataclass
class SignalRow:
    """One attributor (or ``all``): its default and the counts of both signals against it, and of
    the stored signal against the 0.9 quantile."""

    attributor: str
    default: str
    stored: FlagCounts
    to_default: FlagCounts
    quantile: FlagCounts


@dataclass
class CellSignals:
    """Per cell: the gaps of the default and of the 0.9 quantile, both flags, and the rows."""

    gaps: np.ndarray
    quantile_gaps: np.ndarray
    stored: np.ndarray
    to_default: np.ndarray
    rows: list[SignalRow]


def judge_signals(cells: list[Cell], defaults: dict[str, Candidate],
                  margin: float = LOSS_MARGIN) -> CellSignals:
    """Both signals against each attributor's default (``defaults`` by :func:`attributor_of`;
    an attributor not in it has the 0.9 quantile) and against the 0.9 quantile everywhere; one
    row per attributor in sorted order, then ``all``."""
    glob = Candidate("quantile", DEFAULT_QUANTILE, quantile_rule(DEFAULT_QUANTILE))
    names = np.array([attributor_of(c) for c in cells])
    n = len(cells)
    gaps, q_gaps, to_default = (np.full(n, math.nan) for _ in range(3))
    stored = np.array([stored_unsure(c) for c in cells])
    rows = []
    for name in sorted(set(names)):
        idx = np.flatnonzero(names == name)
        group = [cells[i] for i in idx]
        default = defaults.get(name, glob)
        gaps[idx] = candidate_gaps(group, default)[0]
        q_gaps[idx] = candidate_gaps(group, glob)[0]
        to_default[idx] = [_beyond(default_distance(c, default)) for c in group]
        rows.append(SignalRow(name, default.label, flag_counts(gaps[idx], stored[idx], margin),
                              flag_counts(gaps[idx], to_default[idx], margin),
                              flag_counts(q_gaps[idx], stored[idx], margin)))
    if rows:
        rows.append(SignalRow("all", "per attributor", *(
            functools.reduce(operator.add, (getattr(r, k) for r in rows))
            for k in ("stored", "to_default", "quantile"))))
    return CellSignals(gaps, q_gaps, stored, to_default, rows)


def _of(flagged: int, total: int) -> str:
    return f"{flagged} of {total}"


def reliability_lines(judged: CellSignals, margin: float = LOSS_MARGIN) -> list[str]:
    """The report section "Reliability of the default" (markdown lines)."""
    lines = ["## Reliability of the default", "",
             f"Does the retraining-free signal flag the cells where the default loses more than "
             f"{margin:g} LDS to the grid best? Default: each attributor's recommended rule above, "
             f"the same rule on every cell (in sample where it was chosen on these cells). "
             f"`stored`: the `unsure` each cell stores with its selection at xi >= {THRESHOLD:g} "
             f"(xi's lambda and the {REFERENCE_QUANTILE:g} quantile more than {DISTANCE_MAX:g} "
             f"decade apart; recomputed from the stored lambdas on older cells). `to default`: "
             f"xi's lambda at {THRESHOLD:g} and the default's own lambda more than "
             f"{DISTANCE_MAX:g} decade apart (one damping per block: the median over blocks of "
             f"each block's xi lambda against its damping); the same as `stored` where the "
             f"default is the 0.9 quantile. `losing`: cells whose gap exceeds {margin:g}; "
             "`flagged among them` should be high, `flagged among the rest` low. Per cell: "
             "`rules_reliability.csv`.", "",
             "| attributor | default | cells | default losing | flagged among them: stored / to "
             "default | flagged among the rest: stored / to default | q = 0.9 losing | flagged "
             "among them | flagged among the rest |", "|---|---|---|---|---|---|---|---|---|"]
    for r in judged.rows:
        s, d, q = r.stored, r.to_default, r.quantile
        name = "**all**" if r.attributor == "all" else ATTRIBUTOR_NAMES.get(r.attributor,
                                                                            r.attributor)
        lines.append(f"| {name} | {r.default} | {s.cells} | {s.losing} | "
                     f"{_of(s.flagged_losing, s.losing)} / {_of(d.flagged_losing, d.losing)} | "
                     f"{_of(s.flagged_rest, s.cells - s.losing)} / "
                     f"{_of(d.flagged_rest, d.cells - d.losing)} | {q.losing} | "
                     f"{_of(q.flagged_losing, q.losing)} | "
                     f"{_of(q.flagged_rest, q.cells - q.losing)} |")
    return lines


def reliability_rows(cells: list[Cell], judged: CellSignals) -> list[dict[str, Any]]:
    """One CSV row per cell: its gaps under the default and the 0.9 quantile, and both flags."""
    names = [attributor_of(c) for c in cells]
    labels = {r.attributor: r.default for r in judged.rows}
    return [{"file": c.get("file", ""), "setting": setting_key(c), "seed": seed_of(c),
             "attributor": a, "default": labels[a], "default_gap": float(judged.gaps[i]),
             "q0.9_gap": float(judged.quantile_gaps[i]),
             "unsure_stored": _flag(judged.stored[i]), "unsure_to_default": _flag(judged.to_default[i])}
            for i, (c, a) in enumerate(zip(cells, names, strict=True))]


def _flag(x: float) -> str:
    return "" if math.isnan(x) else str(bool(x)).lower()
