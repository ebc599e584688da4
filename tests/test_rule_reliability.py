"""The reliability signal judged against the default, on hand-made cells worked out by hand here.

Every cell has a 4-point grid 1e-3, 1e-2, 1e-1, 1 with the 0.9 quantile at 1e-1 (point 3); xi's
lambda at 0.5 is stored with the cell's ``unsure`` (xi and the 0.9 quantile more than a decade
apart). TRAK's default is the 0.9 quantile; K-FAC's one damping per block (the stored per-block
LDS; on a one-block cell 0.1 x the mean eigenvalue 0.1 = 1e-2, point 2).

    cell  LDS along the grid        xi     unsure   default gap   q gap   to default (decades)
    T1    0.2  0.5   0.4   0.3      5      yes      0.1           0.1     = stored
    T2    0.1  0.155 0.125 0.12     5      yes      0.03 exactly  0.03    = stored
    T3    0.1  0.2   0.3   0.25     0.2    no       0             0       = stored
    T4    0.5  0.4   0.3   0.2      0.005  (none: 1.3 decades -> yes) 0.2 0.2 = stored
    T5    0.3  0.35  0.3   0.2      0.3    no       0.05          0.05    = stored
    K1    0.3  0.6   0.58  0.4      5      yes      0.1 (block)   0.02    blocks 0.3, 0.7, 3 -> 0.7 no
    K2    0.7  0.5   0.4   0.3      0.2    no       0 (block)     0.3     blocks 2, 2.7, 0 -> 2 yes
    K3    0.4  0.3   0.45  0.5      0.5    no       ~0.2 (1e-2)   0.05    xi 0.5 vs 1e-2: 1.7 yes

Losing (gap > 0.03; T2 sits exactly on the margin and does not lose), flagged among the losing /
among the rest:

    TRAK   default = q: 5 cells, losing 3 (T1 T4 T5); stored 2 of 3 (T1 T4) / 1 of 2 (T2)
    K-FAC  default: 3 cells, losing 2 (K1 K3); stored 1 of 2 (K1) / 0 of 1; to default 1 of 2
           (K3) / 1 of 1 (K2); q: losing 2 (K2 K3), stored 0 of 2 / 1 of 1 (K1)
    all    default: 8 cells, losing 5; stored 3 of 5 / 1 of 3; to default 3 of 5 / 2 of 3;
           q: losing 5, stored 2 of 5 / 2 of 3

A flag read the wrong way round gives stored 2 of 5 / 2 of 3; ">= 0.03" makes T2 lose (TRAK:
losing 4, 3 of 4 / 0 of 1); the mean or the max over K1's blocks (1.3, 3) would flag it; K3's
distance measured to the 0.9 quantile instead of its default (0.7) would not flag it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tdatune.study.rule_candidates import default_candidates
from tdatune.study.rule_reliability import (
    FlagCounts,
    default_distance,
    flag_counts,
    judge_signals,
    reliability_lines,
    reliability_rows,
    stored_unsure,
)

GRID = [1e-3, 1e-2, 1e-1, 1.0]
PER_BLOCK = next(c for c in default_candidates() if c.family == "per_layer")


def cell(attributor: str, lds: list[float], xi: float, unsure: bool | None,
         mean: float = 1e-3, **extra) -> dict:
    """A stored cell on the 4-point grid, 0.9 quantile 1e-1; ``unsure`` None: an older cell
    (no reliability block, no spectrum statistics)."""
    sel = {"threshold": 0.5, "lambda": xi}
    if unsure is not None:
        sel["reliability"] = {"unsure": unsure, "distance": abs(math.log10(xi / 0.1))}
    stats = {"quantiles": {"0.9": 0.1}, "mean": mean}
    return {"setting": "s", "setting_name": "s", "attributor": attributor, "method": attributor,
            "fit": {}, "rows": [{"lam": g, "lds": v, "spectrum": True}
                                for g, v in zip(GRID, lds, strict=True)],
            "selections": [sel], "quantile_baselines": {"0.9": [0.1, math.nan]},
            "xi_curve": {"lambdas": GRID, "xi_mean": [0.1, 0.3, 0.5, 0.7], "top_eigenvalue": 1.0},
            **({} if unsure is None else {"spectrum_stats": stats}), **extra}


def blocks(lds: float, own: list[float], xi: list[float]) -> dict:
    """A per-block record: the heuristic's LDS and lambdas, each block's xi lambda."""
    return {"blockwise": {"heuristic": {"lds": lds, "lambdas": own}, "xi": {"lambdas": xi}}}


def cells() -> list[dict]:
    """The eight cells of the module docstring, K-FAC's interleaved with TRAK's."""
    return [
        cell("trak", [0.2, 0.5, 0.4, 0.3], 5.0, True),
        cell("kfac", [0.3, 0.6, 0.58, 0.4], 5.0, True, **blocks(0.5, [1e-2] * 3, [0.02, 0.05, 10.0])),
        cell("trak", [0.1, 0.155, 0.125, 0.12], 5.0, True),
        cell("trak", [0.1, 0.2, 0.3, 0.25], 0.2, False),
        cell("kfac", [0.7, 0.5, 0.4, 0.3], 0.2, False, **blocks(0.7, [1e-3] * 3, [0.1, 0.5, 1e-3])),
        cell("trak", [0.5, 0.4, 0.3, 0.2], 0.005, None),
        cell("kfac", [0.4, 0.3, 0.45, 0.5], 0.5, False, mean=0.1),
        cell("trak", [0.3, 0.35, 0.3, 0.2], 0.3, False),
    ]


def test_the_signals_against_the_default_by_hand():
    judged = judge_signals(cells(), {"kfac": PER_BLOCK})
    assert judged.gaps[2] == 0.03 and judged.quantile_gaps[2] == 0.03  # on the margin exactly
    np.testing.assert_allclose(judged.gaps, [0.1, 0.1, 0.03, 0, 0, 0.2, 0.2, 0.05], atol=1e-9)
    np.testing.assert_allclose(judged.quantile_gaps, [0.1, 0.02, 0.03, 0, 0.3, 0.2, 0.05, 0.05])
    assert judged.stored.tolist() == [1, 1, 1, 0, 0, 1, 0, 0]
    assert judged.to_default.tolist() == [1, 0, 1, 0, 1, 1, 1, 0]
    rows = {r.attributor: r for r in judged.rows}
    assert list(rows) == ["kfac", "trak", "all"]
    assert (rows["trak"].default, rows["kfac"].default) == ("q = 0.9", "per block 0.1 x block mean")
    assert rows["trak"].stored == rows["trak"].to_default == rows["trak"].quantile == \
        FlagCounts(5, 3, 2, 1)
    assert rows["kfac"].stored == FlagCounts(3, 2, 1, 0)
    assert rows["kfac"].to_default == FlagCounts(3, 2, 1, 1)
    assert rows["kfac"].quantile == FlagCounts(3, 2, 0, 1)
    assert rows["all"].stored == FlagCounts(8, 5, 3, 1)
    assert rows["all"].to_default == FlagCounts(8, 5, 3, 2)
    assert rows["all"].quantile == FlagCounts(8, 5, 2, 2)


def test_the_report_section_and_its_rows():
    judged = judge_signals(cells(), {"kfac": PER_BLOCK})
    text = "\n".join(reliability_lines(judged))
    assert text.startswith("## Reliability of the default")
    assert "| TRAK | q = 0.9 | 5 | 3 | 2 of 3 / 2 of 3 | 1 of 2 / 1 of 2 | 3 | 2 of 3 | 1 of 2 |" in text
    assert ("| K-FAC | per block 0.1 x block mean | 3 | 2 | 1 of 2 / 1 of 2 | 0 of 1 / 1 of 1 | 2 | "
            "0 of 2 | 1 of 1 |") in text
    assert "| **all** | per attributor | 8 | 5 | 3 of 5 / 3 of 5 | 1 of 3 / 2 of 3 | 5 | 2 of 5 | " \
        "2 of 3 |" in text
    rows = reliability_rows(cells(), judged)
    assert [r["unsure_stored"] for r in rows[:2]] == ["true", "true"]
    assert [r["unsure_to_default"] for r in rows[:2]] == ["true", "false"]
    assert rows[1]["default_gap"] == pytest.approx(0.1) and rows[1]["q0.9_gap"] == pytest.approx(0.02)


def test_the_stored_verdict_is_read_and_an_older_cell_gets_it_recomputed():
    old = cell("trak", GRID, 0.005, None)           # 1.3 decades from 1e-1: unsure
    assert stored_unsure(old) == 1.0
    assert stored_unsure(cell("trak", GRID, 0.005, False)) == 0.0  # the stored verdict rules
    assert math.isnan(stored_unsure({"selections": []}))


def test_the_distance_to_a_per_block_default_is_the_median_over_blocks():
    k1 = cells()[1]
    assert default_distance(k1, PER_BLOCK) == pytest.approx(math.log10(5))  # 0.3, 0.7, 3
    one_block = cells()[6]                                                  # 0.5 against 1e-2
    assert default_distance(one_block, PER_BLOCK) == pytest.approx(math.log10(50))
    q = default_candidates()[0]
    assert default_distance(k1, q) == pytest.approx(math.log10(50))        # the joint xi


def test_flag_counts_skip_cells_without_a_gap_or_a_flag():
    counts = flag_counts(np.array([0.5, math.nan, 0.031, 0.0, 0.2]),
                         np.array([1.0, 1.0, math.nan, 1.0, 0.0]))
    assert counts == FlagCounts(cells=3, losing=2, flagged_losing=1, flagged_rest=1)
