"""The beyond-LDS part of a sweep report: per cell, how mislabel detection (AUC of
self-influence), removal (effect of taking out the top proponents) and leave-one-out
correlation move with lambda, and how they fare at the lambda the surrogate selects and at
the LDS-best lambda; one figure per method with a panel column per setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tdatune.study.figures import _save
from tdatune.study.plots import _pyplot
from tdatune.study.results import SweepResults
from tdatune.study.spec import plain

METRICS = (  # (name in _curves, label)
    ("mislabel_auc", "mislabel AUC"),
    ("removal_effect", "removal effect"),
    ("loo_pearson", "LOO Pearson"),
)


def _curves(cell: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Per metric, (lambda, value) along the cell's positive lambdas, ascending (TRAK's
    undamped lambda = 0 has no place on a log axis)."""
    out: dict[str, list[tuple[float, float]]] = {}
    lds = [(r["lam"], r["lds"]) for r in cell.get("rows", []) if r.get("lam", 0) > 0]
    if lds:
        out["lds"] = sorted(lds)
    mis = cell.get("mislabel", {}).get("rows", [])
    if mis and "lam" in mis[0]:
        out["mislabel_auc"] = sorted((r["lam"], r["auc"]) for r in mis if r["lam"] > 0)
    rem = {r["lam"]: r["effect"] for r in cell.get("removal", {}).get("rows", [])
           if r["lam"] > 0}  # grid picks and rule lambdas: all measured (NaN: no damping)
    if rem:
        out["removal_effect"] = sorted(rem.items())
    loo = cell.get("removal", {}).get("loo", [])
    if loo and np.isfinite(loo[0]["lam"]):
        out["loo_pearson"] = sorted((r["lam"], r["pearson"]) for r in loo if r["lam"] > 0)
    return out


def _at(curve: list[tuple[float, float]], lam: float) -> float:
    """The curve's value at ``lam`` (linear in log lambda between its points)."""
    x = np.log([c[0] for c in curve])
    return float(np.interp(np.log(lam), x, [c[1] for c in curve]))


def _rule_value(cell: dict[str, Any], metric: str, rule: str,
                curve: list[tuple[float, float]] | None) -> float:
    """A metric at one rule's lambda: measured there when the cell did, else interpolated."""
    if metric == "mislabel_auc" and rule in cell.get("mislabel", {}).get("rules", {}):
        return float(cell["mislabel"]["rules"][rule]["auc"])
    if metric == "removal_effect":
        for r in cell.get("removal", {}).get("rows", []):
            if r.get("rule") == rule:
                return float(r["effect"])
    lam = _rule_lambda(cell, rule)
    return _at(curve, lam) if curve and lam is not None else float("nan")


def _rule_lambda(cell: dict[str, Any], rule: str) -> float | None:
    for r in cell.get("removal", {}).get("rows", []):
        if r.get("rule") == rule:
            return float(r["lam"])
    hit = cell.get("mislabel", {}).get("rules", {}).get(rule)
    return None if hit is None else float(hit["lam"])


def path_cells(results: SweepResults) -> list[dict[str, Any]]:
    """The cells that trace lambda: damped cells scored along the spectrum grid, and cells of
    undamped methods (TracIn) at the study defaults. A one-factor cell at one damping (another
    projection size, checkpoint, ...) belongs to :mod:`tdatune.study.beyond_factors`."""
    out = []
    for cell in results.cells:
        if any(r.get("spectrum") for r in cell.get("rows", [])):
            out.append(cell)
        elif not any("lam" in r for r in cell.get("rows", [])):
            base = plain(tuple(results.spec.method(cell["method"]).base_values().items()))
            if all(base[k] == v for k, v in cell["fit"].items() if k in base):
                out.append(cell)
    return out


def beyond_rows(results: SweepResults) -> list[dict[str, Any]]:
    """Per cell with a beyond-LDS metric and per metric: its best value over lambda, its value
    at the surrogate's lambda, at the LDS-best lambda and at the 0.9 quantile, and the LDS at
    the metric's own best lambda."""
    xi = f"xi@{results.spec.threshold:g}"
    out = []
    for cell in path_cells(results):
        curves = _curves(cell)
        for name, label in METRICS:
            curve = curves.get(name)
            if not curve:
                if name == "mislabel_auc" and cell.get("mislabel", {}).get("rows"):
                    v = cell["mislabel"]["rows"][0]["auc"]  # no lambda (TracIn)
                    out.append({"setting": cell["setting"], "method": cell["method"],
                                "metric": label, "best": v, "best_lam": float("nan"),
                                "at_surrogate": float("nan"), "at_lds_best": float("nan"),
                                "at_q0.9": float("nan"), "lds_at_metric_best": float("nan"),
                                "file": cell["file"]})
                continue
            finite = [c for c in curve if np.isfinite(c[1])]
            best = max(finite, key=lambda c: c[1]) if finite else (float("nan"), float("nan"))
            lds = curves.get("lds")
            out.append({
                "setting": cell["setting"], "method": cell["method"], "metric": label,
                "best": best[1], "best_lam": best[0],
                "at_surrogate": _rule_value(cell, name, xi, curve),
                "at_lds_best": _rule_value(cell, name, "lds-best", curve),
                "at_q0.9": _rule_value(cell, name, "q0.9", curve),
                "lds_at_metric_best": _at(lds, best[0]) if lds and finite else float("nan"),
                "file": cell["file"]})
    return out


def beyond_table(rows: list[dict[str, Any]], threshold: float) -> list[str]:
    """The report's Markdown section (empty without beyond-LDS cells)."""
    if not rows:
        return []
    lines = ["", "## Beyond LDS: mislabel detection, removal, leave-one-out", "",
             "Per cell and metric: the best value over lambda (and where), the value at the "
             f"surrogate's lambda (xi at {threshold:g}), at the LDS-best lambda and at the 0.9 "
             "spectrum quantile. Mislabel AUC: self-influence ranking of the flipped labels "
             "(0.5 = chance). Removal effect: how much more removing each explained example's "
             "top proponents lowers its output than removing as many random examples. LOO: "
             "Pearson of scores with leave-one-out effects. Source: `beyond.csv`.", "",
             "| setting | method | metric | best | at λ | at surrogate λ | at LDS-best λ | "
             "at q=0.9 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['method']} | {r['metric']} | {_f(r['best'])} | "
                     f"{_f(r['best_lam'], '.2g')} | {_f(r['at_surrogate'])} | "
                     f"{_f(r['at_lds_best'])} | {_f(r['at_q0.9'])} |")
    return lines


def _f(x: float, fmt: str = ".3f") -> str:
    return "—" if x is None or not np.isfinite(x) else format(x, fmt)


def label_panel(ax: Any, row: int, col: int, ylabel: str, title: str) -> None:
    """A grid of metric panels: a light grid, the metric on the first column, the title and
    the legend on the first row."""
    ax.grid(alpha=0.3)
    if col == 0:
        ax.set_ylabel(ylabel, fontsize=8)
    if row == 0:
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)


def beyond_figures(results: SweepResults, figdir: Path) -> list[dict[str, Any]]:
    """Per method with beyond-LDS cells: LDS and each metric against lambda, one column per
    setting, the surrogate's lambda (green) and the LDS-best lambda (black) marked."""
    plt = _pyplot()
    xi = f"xi@{results.spec.threshold:g}"
    made = []
    paths = path_cells(results)
    for method in results.spec.methods:
        by_cell = [(c, _curves(c)) for c in paths if c["method"] == method.label]
        by_cell = [(c, cv) for c, cv in by_cell if any(k in cv for k, _ in METRICS)]
        if not by_cell:
            continue
        cells = [c for c, _ in by_cell]
        names = ["lds"] + [m for m, _ in METRICS if any(m in cv for _, cv in by_cell)]
        labels = {"lds": "LDS", **dict(METRICS)}
        fig, axes = plt.subplots(len(names), len(cells), squeeze=False,
                                 figsize=(3.6 * len(cells), 2.3 * len(names)), sharex="col")
        rows = []
        for col, (cell, curves) in enumerate(by_cell):
            marks = {"surrogate": _rule_lambda(cell, xi), "LDS best": _rule_lambda(cell, "lds-best")}
            for row, name in enumerate(names):
                ax = axes[row][col]
                curve = curves.get(name)
                if curve:
                    ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", ms=3, lw=1.3)
                    rows += [{"setting": cell["setting"], "method": method.label, "metric": name,
                              "lam": x, "value": y, "file": cell["file"]} for x, y in curve]
                for (what, lam), color in zip(marks.items(), ("C2", "black"), strict=True):
                    if lam is not None:
                        ax.axvline(lam, color=color, lw=1, ls="--", label=what)
                ax.set_xscale("log")
                label_panel(ax, row, col, labels[name], cell["setting"])
            axes[-1][col].set_xlabel("λ", fontsize=8)
        fig.suptitle(f"{method.label}: LDS and the beyond-LDS metrics against λ (green: "
                     "surrogate's λ; black: LDS-best λ)", fontsize=10)
        fig.tight_layout()
        made.append(_save(fig, figdir, f"beyond_{method.label}", rows,
                          f"{method.label}: LDS, mislabel AUC, removal effect and LOO Pearson "
                          "against λ per setting", [], files=[c["file"] for c in cells]))
    return made
