"""Selection rules across sweeps: gaps, sides and the leave-one-setting-out threshold, checked
on hand-worked rows and against the cell files of a real (tiny) sweep."""

from __future__ import annotations

import json

import pytest

from sweep_specs import tiny_head
from tdatune.cli import main
from tdatune.study.rules import leave_one_setting_out, quantiles_of, side, summarise, thresholds_of


def row(study, setting, best, lam_best, **scored):
    r = {"study": study, "setting": setting, "best_lds": best, "best_lam": lam_best}
    for t, (lam, lds) in scored.items():
        r[f"lam@{t[1:].replace('_', '.')}"] = lam
        r[f"lds@{t[1:].replace('_', '.')}"] = lds
    return r


# three settings; threshold 0.4 is best on A and B, 0.6 on C
ROWS = [
    row("s", "A", 0.9, 1e-3, t0_4=(1e-3, 0.9), t0_6=(1e-2, 0.7)),
    row("s", "B", 0.8, 1e-2, t0_4=(1e-2, 0.79), t0_6=(1e-1, 0.6)),
    row("s", "C", 0.5, 1e-1, t0_4=(1e-3, 0.2), t0_6=(1e-1, 0.5)),
    row("t", "C", 0.5, 1e-1, t0_4=(1e-3, 0.2), t0_6=(1e-1, 0.5)),  # C again, in a second study
]


def test_summaries_and_sides_by_hand():
    (s4, s6) = summarise(ROWS[:3], [0.4, 0.6], [])
    assert s4.mean == pytest.approx((0.0 + 0.01 + 0.3) / 3)
    assert s4.worst == pytest.approx(0.3) and s4.median == pytest.approx(0.01)
    assert s6.mean == pytest.approx((0.2 + 0.2 + 0.0) / 3)
    assert [side(r, 0.4) for r in ROWS[:3]] == ["at", "at", "below"]
    assert [side(r, 0.6) for r in ROWS[:3]] == ["above", "above", "at"]


def test_only_thresholds_and_quantiles_every_row_scored_are_compared() -> None:
    """thresholds_of / quantiles_of: the intersection over rows, never the union."""
    rows = [row("s", "A", 0.9, 1e-3, t0_4=(1e-3, 0.9), t0_5=(1e-3, 0.9), t0_6=(1e-2, 0.7)),
            row("t", "B", 0.8, 1e-2, t0_5=(1e-2, 0.79), t0_7=(1e-1, 0.6))]
    rows[0].update({"lds@q0.1": 0.2, "lds@q0.5": 0.5})
    rows[1].update({"lds@q0.5": 0.4, "lds@q0.9": 0.7})
    assert thresholds_of(rows) == [0.5]
    assert quantiles_of(rows) == ["0.5"]
    assert thresholds_of(rows[:1]) == [0.4, 0.5, 0.6]
    # the common rule is comparable on every row; the others could not be
    (s5,) = summarise(rows, thresholds_of(rows), [])
    assert s5.cells == 2 and s5.mean == pytest.approx((0.0 + 0.01) / 2)


def test_leave_one_setting_out_by_hand():
    loso = {r["setting"]: r for r in leave_one_setting_out(ROWS, [0.4, 0.6], default=0.6)}
    # a setting is left out with every study's cells of it: C's two rows go together
    assert sorted(loso) == ["A", "B", "C"] and loso["C"]["cells"] == 2
    # without A: 0.4 has mean gap (0.01 + 0.3 + 0.3) / 3, 0.6 has 0.2 / 3 -> 0.6, gap 0.2 on A
    assert loso["A"]["calibrated_threshold"] == 0.6
    assert loso["A"]["gap_calibrated"] == pytest.approx(0.2)
    # without C: 0.4 (0.005) beats 0.6 (0.2) -> 0.4, gap 0.3 on C, where the default has 0
    assert loso["C"]["calibrated_threshold"] == 0.4
    assert loso["C"]["gap_calibrated"] == pytest.approx(0.3)
    assert loso["C"]["gap_default"] == pytest.approx(0.0)


def test_rules_cli_on_a_sweep_matches_its_cell_files(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(tiny_head("tiny") + '''
[[methods]]
name = "iffim"
vary = [{ lam = "spectrum" }, { proj_dim = [16] }]
''')
    assert main(["sweep", str(spec), "--out", str(tmp_path / "sw"), "--quiet"]) == 0
    assert main(["rules", str(tmp_path / "sw"), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "rules.md").read_text()
    gaps = []
    for f in sorted((tmp_path / "sw" / "cells").glob("*.json")):
        cell = json.loads(f.read_text())
        grid = [r["lds"] for r in cell["rows"] if r["spectrum"]]
        if grid:  # the proj_dim cell is scored at the default lambda only: no oracle
            (sel,) = [s for s in cell["selections"] if s["threshold"] == 0.5]  # the spec's threshold
            gaps.append(max(grid) - sel["lds"])
    assert len(gaps) == 1
    mean = gaps[0]
    line = next(x for x in text.splitlines() if x.startswith("| surrogate xi >= 0.5 |"))
    assert float(line.split("|")[3].strip("* ")) == pytest.approx(mean, abs=5e-4)
    # the same directory twice: its cells are counted once
    assert main(["rules", str(tmp_path / "sw"), str(tmp_path / "sw"), "--out",
                 str(tmp_path / "r2")]) == 0
    assert "| surrogate xi >= 0.5 | 1 | " in (tmp_path / "r2" / "rules.md").read_text()
    assert main(["rules", str(tmp_path / "sw"), "--out", str(tmp_path / "r"),
                 "--default", "0.7"]) == 2
