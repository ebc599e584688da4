"""What cells that recorded the product's own choice say about it (``tdatune rules``): per
attributor, the gap to the grid best of the default damping the cell recorded
(``default_selection``), of the 0.9 quantile and of xi; whether the gradient-flow filter's best
beats the best damping (``flow``); and the few-retrain choice among candidate dampings
(``candidate_calibration``): its median and worst out-of-sample draw at each K.

Unlike the rules read off the LDS grid by interpolation, these numbers were measured at the
exact lambdas (one per layer where the rule gives that). Cells written before these fields
existed are skipped and counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tdatune.study.diagnosis import CALIBRATION_K
from tdatune.study.rule_candidates import attributor_of


def recorded_row(cell: dict[str, Any]) -> dict[str, Any] | None:
    """One cell's numbers (None when it recorded no default selection)."""
    default = cell.get("default_selection")
    grid = [r for r in cell.get("rows", []) if r.get("spectrum") and np.isfinite(r["lds"])]
    if default is None or not grid:
        return None
    best = max(r["lds"] for r in grid)
    xi = next((s for s in cell.get("selections", []) if s["threshold"] == 0.5), None)
    q9 = cell.get("quantile_baselines", {}).get("0.9")
    row: dict[str, Any] = {
        "setting": cell["setting"], "attributor": attributor_of(cell), "rule": default["rule"],
        "best_lds": best, "gap_default": best - default["lds"],
        "gap_q0.9": best - q9[1] if q9 else float("nan"),
        "gap_xi": best - xi["lds"] if xi else float("nan"),
        "flow_minus_damping": (max(cell["flow"]["lds"]) - best) if "flow" in cell else float("nan")}
    draws = cell.get("candidate_calibration", {}).get("draws", {})
    for k in map(str, CALIBRATION_K):
        for key, suffix in (("paired", ""), ("paired_z0", "_z0"), ("paired_z1", "_z1"),
                            ("candidates_best", "_best_candidate")):
            gaps = draws.get(k, {}).get(key)
            row[f"k{k}_median{suffix}"] = float(np.median(gaps)) if gaps else float("nan")
            row[f"k{k}_worst{suffix}"] = float(np.max(gaps)) if gaps else float("nan")
    return row


def recorded_rows(cells: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The rows of every cell that recorded a default selection, and how many did not."""
    rows = [r for r in (recorded_row(c) for c in cells) if r is not None]
    return rows, len(cells) - len(rows)


def _stat(values: list[float], how: str) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not v.size:
        return "—"
    return f"{(v.mean() if how == 'mean' else v.max()):.3f}"


def recorded_lines(cells: list[dict[str, Any]]) -> list[str]:
    """The report section (empty when no cell recorded a default selection)."""
    rows, skipped = recorded_rows(cells)
    if not rows:
        return []
    lines = ["## The product's own choice, as the cells recorded it", "",
             f"{len(rows)} cells recorded the default damping of their attributor and its LDS "
             f"({skipped} older cells did not). Gap to the grid best, mean / worst; flow: the "
             "best LDS of the gradient-flow filter along the same grid minus the best damping's "
             "(> 0: the flow filter wins); K = 5: choosing among candidate dampings with five "
             "retrained models by paired differences, median / worst draw of each cell's gaps "
             "on the unseen subsets, then mean of medians / worst of worsts.", "",
             "| attributor | cells | default rule | default | q = 0.9 | ξ ≥ 0.5 | flow − damping, "
             "mean / max | K = 5 |", "|---|---|---|---|---|---|---|---|"]
    for name in [*sorted({r["attributor"] for r in rows}), "all"]:
        held = [r for r in rows if name in ("all", r["attributor"])]
        rules = sorted({r["rule"] for r in held})

        def pair(key: str, held: list[dict[str, Any]] = held) -> str:
            return f"{_stat([r[key] for r in held], 'mean')} / {_stat([r[key] for r in held], 'max')}"

        lines.append(
            f"| {name} | {len(held)} | {', '.join(rules) if name != 'all' else '(each its own)'} | "
            f"{pair('gap_default')} | {pair('gap_q0.9')} | {pair('gap_xi')} | "
            f"{pair('flow_minus_damping')} | {_stat([r['k5_median'] for r in held], 'mean')} / "
            f"{_stat([r['k5_worst'] for r in held], 'max')} |")
    return lines


__all__ = ["recorded_lines", "recorded_row", "recorded_rows"]
