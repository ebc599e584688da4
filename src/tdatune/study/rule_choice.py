"""The default rule per attributor, chosen out of sample (nested leave one setting out).

For each group of cells (one attributor, or one family of attributors: eigen-kernel, Kronecker,
truncated) and each of its settings held out, the candidate rule with its constant
(:mod:`tdatune.study.rule_candidates`) with the smallest mean gap over the group's cells of the
*other* settings is chosen and applied to the held-out setting's cells. A setting's cells (every
training seed of it) never take part in the choice that is judged on them; the out-of-sample
gap of the "attributor-aware default" is the gap of those choices on the cells they were not
chosen on. The rule chosen on all of a group's settings (in sample) is the one to put in code.

:func:`recommend` then keeps, per attributor, the per-attributor or per-kind choice only where
it beats the global default (the 0.9 quantile) out of sample in both mean and worst gap, on at
least ``MIN_SETTINGS`` settings; this second step looks at the out-of-sample numbers of the same
cells, so the gain it reports is slightly optimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tdatune.study.rule_candidates import (
    Candidate,
    CandidateGaps,
    attributor_of,
    kind_of,
    score_candidates,
)
from tdatune.study.rule_compare import Cell, setting_key

MIN_SETTINGS = 3  # a group judged on fewer settings keeps the global default


@dataclass
class Fold:
    """One held-out setting of a group: the candidate chosen on the group's other settings
    (None: the group has no other setting) and the indices of the held-out cells."""

    held_out: str
    cells: np.ndarray
    choice: int | None


@dataclass
class GroupChoice:
    """The nested choice of one group: its folds, the out-of-sample gap of every cell (NaN
    outside the group and where a fold had no other setting), and the choice on all its
    settings (in sample)."""

    group: str
    members: np.ndarray
    folds: list[Fold]
    oos: np.ndarray
    overall: int


def choose(gaps: np.ndarray, train: np.ndarray) -> int:
    """The candidate (row of ``gaps``) with the smallest mean gap over the ``train`` cells; the
    first one listed among equals."""
    with np.errstate(invalid="ignore"):
        means = [np.nanmean(row[train]) if np.isfinite(row[train]).any() else np.inf
                 for row in gaps]
    return int(np.argmin(means))


def nested_choice(gaps: np.ndarray, groups: np.ndarray,
                  settings: np.ndarray) -> dict[str, GroupChoice]:
    """Per group: leave each setting out, choose on the group's other settings, apply to it."""
    out = {}
    for group in sorted(set(groups)):
        member = groups == group
        folds, oos = [], np.full(len(groups), math.nan)
        for setting in sorted(set(settings[member])):
            held = member & (settings == setting)
            train = member & (settings != setting)
            choice = choose(gaps, train) if train.any() else None
            if choice is not None:
                oos[held] = gaps[choice, held]
            folds.append(Fold(str(setting), np.flatnonzero(held), choice))
        out[str(group)] = GroupChoice(str(group), np.flatnonzero(member), folds, oos,
                                      choose(gaps, member))
    return out


@dataclass
class Choices:
    """The scored candidates, the per-attributor and per-kind nested choices, and each cell's
    attributor, kind and setting."""

    table: CandidateGaps
    by_attributor: dict[str, GroupChoice]
    by_kind: dict[str, GroupChoice]
    attributors: np.ndarray
    kinds: np.ndarray
    settings: np.ndarray

    def kind_choice(self, attributor: str) -> GroupChoice:
        """The per-kind choice an attributor belongs to."""
        return self.by_kind[str(self.kinds[self.by_attributor[attributor].members[0]])]


def choose_defaults(cells: list[Cell], candidates: list[Candidate] | None = None) -> Choices:
    """Score the candidates (default: all) on ``cells`` and choose per attributor and kind."""
    table = score_candidates(cells, candidates)
    settings = np.array([setting_key(c) for c in cells])
    attributors = np.array([attributor_of(c) for c in cells])
    kinds = np.array([kind_of(c) for c in cells])
    return Choices(table, nested_choice(table.gaps, attributors, settings),
                   nested_choice(table.gaps, kinds, settings), attributors, kinds, settings)


def mean_worst(g: np.ndarray) -> tuple[float, float]:
    """Mean and worst of the finite gaps (NaN, NaN when none)."""
    g = g[np.isfinite(g)]
    return (math.nan, math.nan) if g.size == 0 else (float(g.mean()), float(g.max()))


@dataclass
class Recommendation:
    """The default for one attributor: the candidate, which choice it came from (``attributor``,
    ``kind`` or ``global``), and the out-of-sample gaps of that choice against the global
    default's on the attributor's cells."""

    attributor: str
    candidate: Candidate
    source: str
    oos: tuple[float, float]
    default: tuple[float, float]


def recommend(ch: Choices) -> dict[str, Recommendation]:
    """Per attributor, the per-attributor or per-kind choice with the smaller out-of-sample mean
    among those that beat the global default in mean and worst on at least ``MIN_SETTINGS``
    settings (every cell judged); otherwise the global default."""
    out = {}
    for name, own in ch.by_attributor.items():
        m = own.members
        default = mean_worst(ch.table.gaps[0, m])
        best = Recommendation(name, ch.table.candidates[0], "global", default, default)
        for source, group in (("attributor", own), ("kind", ch.kind_choice(name))):
            gaps = group.oos[m]
            mean, worst = mean_worst(gaps)
            if (len(own.folds) >= MIN_SETTINGS and np.isfinite(gaps).all()
                    and mean < default[0] and worst <= default[1] and mean < best.oos[0]):
                best = Recommendation(name, ch.table.candidates[group.overall], source,
                                      (mean, worst), default)
        out[name] = best
    return out


def recommended_gaps(ch: Choices, recs: dict[str, Recommendation]) -> np.ndarray:
    """Every cell's out-of-sample gap under the recommended defaults: the nested choice it came
    from (per attributor or per kind), or the global default's gap."""
    out = ch.table.gaps[0].copy()
    for name, rec in recs.items():
        m = ch.by_attributor[name].members
        if rec.source == "attributor":
            out[m] = ch.by_attributor[name].oos[m]
        elif rec.source == "kind":
            out[m] = ch.kind_choice(name).oos[m]
    return out
