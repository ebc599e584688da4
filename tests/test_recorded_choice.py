"""The report section on what cells recorded (default damping, flow filter, few-retrain
choice), on hand-made cells whose numbers are worked out here."""

from __future__ import annotations

import math

from tdatune.study.recorded_choice import recorded_lines, recorded_rows


def _cell(attributor: str, grid: list[float], default: float, q9: float, xi: float,
          flow: list[float], k5: list[float], blocks: str | None = None) -> dict:
    return {"setting": "s", "attributor": attributor, "fit": {"blocks": blocks} if blocks else {},
            "rows": [{"lam": 10.0 ** -i, "lds": v, "spectrum": True} for i, v in enumerate(grid)],
            "default_selection": {"rule": "per_layer" if attributor == "kfac" else "quantile",
                                  "lambda": 1e-3, "lds": default},
            "quantile_baselines": {"0.9": [1e-2, q9]},
            "selections": [{"threshold": 0.4, "lds": 0.0}, {"threshold": 0.5, "lds": xi}],
            "flow": {"lambdas": [1.0] * len(flow), "lds": flow},
            "candidate_calibration": {"draws": {"5": {"paired": k5}}}}


CELLS = [
    # best 0.6 (the middle of the grid, not its end); default 0.55 -> gap 0.05
    _cell("kfac", [0.2, 0.6, 0.4], 0.55, 0.3, 0.5, [0.1, 0.62, 0.3], [0.0, 0.2, 0.04]),
    # best 0.9; default 0.9 -> gap 0; flow best 0.85 -> -0.05
    _cell("kfac", [0.9, 0.8, 0.1], 0.9, 0.7, 0.85, [0.85, 0.2, 0.1], [0.01, 0.03, 0.02]),
    _cell("logra", [0.5, 0.4], 0.45, 0.45, 0.3, [0.5, 0.1], [0.05, 0.07, 0.06], blocks="layer"),
    {"setting": "old", "attributor": "iffim", "rows": [{"lam": 1.0, "lds": 0.3, "spectrum": True}]},
]


def test_rows_by_hand():
    rows, skipped = recorded_rows(CELLS)
    assert skipped == 1 and [r["attributor"] for r in rows] == ["kfac", "kfac", "logra-layer"]
    first, second, third = rows
    assert math.isclose(first["gap_default"], 0.05) and math.isclose(first["gap_q0.9"], 0.3)
    assert math.isclose(first["gap_xi"], 0.1)
    assert math.isclose(first["flow_minus_damping"], 0.02)
    assert first["k5_median"] == 0.04 and first["k5_worst"] == 0.2
    assert second["gap_default"] == 0.0 and math.isclose(second["flow_minus_damping"], -0.05)
    assert math.isclose(third["gap_default"], 0.05) and math.isnan(third["k3_worst"])


def test_the_section_averages_and_takes_the_worst():
    """kfac: default gaps 0.05 and 0 -> mean 0.025, worst 0.050; flow 0.02 and -0.05 ->
    mean -0.015, max 0.020; K = 5 medians 0.04 and 0.02 -> 0.030, worst of worsts 0.200."""
    lines = recorded_lines(CELLS)
    (kfac,) = [x for x in lines if x.startswith("| kfac |")]
    assert kfac == ("| kfac | 2 | per_layer | 0.025 / 0.050 | 0.250 / 0.300 | 0.075 / 0.100 | "
                    "-0.015 / 0.020 | 0.030 / 0.200 |")
    assert "(1 older cells did not)" in lines[2]
    assert recorded_lines(CELLS[3:]) == []
