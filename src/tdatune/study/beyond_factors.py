"""The beyond-LDS metrics one factor at a time: for every one-factor sub-experiment other than
the damping (projection size, checkpoint, checkpoint set, ...), the LDS, the mislabel AUC and
the removal effect at each value, at the sub-experiment's damping and at the surrogate's; a
table of how far each metric moves and one figure per method."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tdatune.study.beyond_report import _f, label_panel
from tdatune.study.figures import _line, _save, _x_axis, styles
from tdatune.study.plots import _pyplot
from tdatune.study.results import SweepResults
from tdatune.study.spec import ALPHA

METRICS = (  # (column, label): the metrics a one-factor row carries
    ("lds", "LDS"),
    ("mislabel_auc", "mislabel AUC"),
    ("removal_effect", "removal effect"),
    ("removal_effect_xi", "removal effect at ξ's λ"),
)


def _same(a: float, b: float | None) -> bool:
    return b is not None and math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def mislabel_at(cell: dict[str, Any], lam: float | None) -> float:
    """The cell's mislabel AUC at ``lam`` (a damped cell's row there; a cell without damping,
    e.g. TracIn, has one row); NaN where not measured."""
    rows = cell.get("mislabel", {}).get("rows", [])
    if rows and "lam" not in rows[0]:
        return float(rows[0]["auc"])
    return next((float(r["auc"]) for r in rows if _same(r["lam"], lam)), float("nan"))


def removal_at(cell: dict[str, Any], lam: float | None, rule: str = "grid",
               field: str = "effect") -> float:
    """The cell's removal effect at ``lam`` among its ``rule`` rows (``grid``: the damping of
    the sub-experiment; ``xi@t``: the surrogate's, whatever its value); a cell without damping
    has one ``default`` row, and no surrogate. ``field``: ``effect`` or ``effect_sem``. NaN
    where not measured."""
    rows = cell.get("removal", {}).get("rows", [])
    if rows and rows[0].get("rule") == "default":
        return float(rows[0].get(field, "nan")) if rule == "grid" else float("nan")
    for r in rows:
        if r.get("rule") == rule and (rule != "grid" or _same(r["lam"], lam)):
            return float(r.get(field, "nan"))
    return float("nan")


def factor_rows(results: SweepResults) -> list[dict[str, Any]]:
    """One row per value of every one-factor sub-experiment that is not lambda nor alpha, on
    cells that record a beyond-LDS metric: LDS, mislabel AUC and removal effect there."""
    xi = f"xi@{results.spec.threshold:g}"
    out = []
    for sub in results.experiments:
        if len(sub.keys) != 1 or sub.keys[0] in ("lam", ALPHA):
            continue
        key = sub.keys[0]
        for rec in sub.records:
            cell = results.cell(rec["cell_id"])
            if cell is None or not ("mislabel" in cell or "removal" in cell):
                continue
            lam = rec.get("row_lam")
            out.append({"setting": sub.setting, "method": sub.method, "hyperparameter": key,
                        "value": rec[key], "lam": lam, "lds": rec["lds"], "lds_sem": rec["sem"],
                        "mislabel_auc": mislabel_at(cell, lam),
                        "removal_effect": removal_at(cell, lam),
                        "removal_effect_sem": removal_at(cell, lam, field="effect_sem"),
                        "removal_effect_xi": removal_at(cell, None, xi),
                        "removal_effect_xi_sem": removal_at(cell, None, xi, "effect_sem"),
                        "file": rec["file"]})
    return out


def factor_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (setting, method, hyperparameter): each metric's range over the values and the value
    where it is highest."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["method"], r["hyperparameter"]), []).append(r)
    out = []
    for (setting, method, key), group in groups.items():
        entry: dict[str, Any] = {"setting": setting, "method": method, "hyperparameter": key,
                                 "values": len(group)}
        for name, _ in METRICS:
            finite = [r for r in group if np.isfinite(r[name])]
            best = max(finite, key=lambda r: r[name]) if finite else None
            entry[f"{name}_range"] = (best[name] - min(r[name] for r in finite)
                                      if best else float("nan"))
            entry[f"{name}_best_at"] = best["value"] if best else None
        out.append(entry)
    return out


def factor_table(summary: list[dict[str, Any]]) -> list[str]:
    """The report's Markdown section (empty without one-factor beyond-LDS rows)."""
    if not summary:
        return []
    lines = ["", "## Beyond LDS, one factor at a time", "",
             "Per one-factor sub-experiment: how far each metric moves when only that "
             "hyperparameter does (range over its values; best at), at the sub-experiment's "
             "damping, and the removal effect also at the surrogate's damping of each cell. "
             "Source: `beyond_factors.csv` (every value), `beyond_factors_summary.csv`.", "",
             "| setting | method | hyperparameter | values | "
             + " | ".join(label for _, label in METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for s in summary:
        cols = [f"{_f(s[f'{n}_range'])} ({s[f'{n}_best_at']})" if np.isfinite(s[f"{n}_range"])
                else "—" for n, _ in METRICS]
        lines.append(f"| {s['setting']} | {s['method']} | {s['hyperparameter']} | "
                     f"{s['values']} | " + " | ".join(cols) + " |")
    return lines


def factor_figures(rows: list[dict[str, Any]], figdir: Path) -> list[dict[str, Any]]:
    """Per method: a column per varied hyperparameter, a row per metric, a line per setting."""
    plt = _pyplot()
    made = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        keys = list(dict.fromkeys(r["hyperparameter"] for r in mine))
        names = [(n, label) for n, label in METRICS if any(np.isfinite(r[n]) for r in mine)]
        fig, axes = plt.subplots(len(names), len(keys), squeeze=False,
                                 figsize=(3.6 * len(keys), 2.3 * len(names)))
        for col, key in enumerate(keys):
            at_key = [r for r in mine if r["hyperparameter"] == key]
            settings = list(dict.fromkeys(r["setting"] for r in at_key))
            for row, (name, label) in enumerate(names):
                ax = axes[row][col]
                numeric, cats = _x_axis(ax, key, [r["value"] for r in at_key])
                for setting, style in zip(settings, styles(len(settings)), strict=True):
                    _line(ax, [r for r in at_key if r["setting"] == setting], "value", numeric,
                          cats, style, setting, y=name, sem=f"{name}_sem")
                label_panel(ax, row, col, label, key)
                if row != len(names) - 1:
                    ax.set_xlabel("")
        fig.suptitle(f"{method}: LDS and the beyond-LDS metrics, one hyperparameter at a time "
                     "(others at the study defaults; bands: ± 1 s.e.)", fontsize=10)
        fig.tight_layout()
        made.append(_save(fig, figdir, f"beyond_factors_{method}", mine,
                          f"{method}: LDS, mislabel AUC and removal effect against each "
                          "hyperparameter varied alone", [], files=[r["file"] for r in mine]))
    return made
