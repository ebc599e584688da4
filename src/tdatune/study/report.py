"""Tables, figures and a Markdown report from a sweep directory's cell files."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tdatune.study.plots import _pyplot, save_figure
from tdatune.utils.atomic import atomic_write_text, read_json


def load_cells(out: str | Path) -> list[dict[str, Any]]:
    """Every finished cell of the sweep in ``out`` (with its file name)."""
    files = sorted((Path(out) / "cells").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{out}/cells holds no finished cells; run the sweep first")
    return [{**read_json(f), "file": f"cells/{f.name}"} for f in files]


def flatten_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (cell, score-stage value) with setting, method and all hyperparameters."""
    rows = []
    for cell in cells:
        for row in cell["rows"]:
            rows.append({"setting": cell["setting"], "method": cell["method"], **cell["fit"], **row,
                         "file": cell["file"]})
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _hp_label(fit: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(fit.items())) or "defaults"


def write_report(out: str | Path) -> Path:
    """Write ``results.csv``, one figure per (setting, method) and ``report.md`` into ``out``."""
    out = Path(out)
    cells = load_cells(out)
    rows = flatten_rows(cells)
    _write_csv(out / "results.csv", rows)
    lines = [f"# Sweep report: {out.name}", ""]
    sources = sorted({(c["setting"], c.get("data_source", "")) for c in cells})
    lines += ["Data: " + "; ".join(f"`{s}` — {src}" for s, src in sources), ""]
    lines += ["## Best LDS per setting and method", "",
              "| setting | method | best LDS ± sem | at | LDS spread (max − min) | surrogate λ | "
              "surrogate LDS | cells |", "|---|---|---|---|---|---|---|---|"]
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        by_pair[(cell["setting"], cell["method"])].append(cell)
    figures = []
    for (setting, method), group in sorted(by_pair.items()):
        group = [c for c in group if c["rows"]]
        flat = [(c, r) for c in group for r in c["rows"] if r["lds"] is not None
                and not math.isnan(r["lds"])]
        if not flat:
            continue
        best_cell, best_row = max(flat, key=lambda cr: cr[1]["lds"])
        where = _hp_label({**best_cell["fit"], **{k: v for k, v in best_row.items()
                                                   if k not in ("lds", "sem")}})
        spread = max(r["lds"] for _, r in flat) - min(r["lds"] for _, r in flat)
        sur = [c["surrogate"] for c in group if "surrogate" in c]
        sur_best = max(sur, key=lambda s: s["lds"]) if sur else None
        sur_lam = _fmt(sur_best["lambda"]) if sur_best else "—"
        sur_lds = f"{sur_best['lds']:.3f}" if sur_best else "—"
        lines.append(
            f"| {setting} | {method} | {best_row['lds']:.3f} ± {best_row['sem']:.3f} | {where} | "
            f"{spread:.3f} | {sur_lam} | {sur_lds} | {len(group)} |")
        figures.append(_plot_pair(out, setting, method, group))
    lines += ["", "## Figures", ""]
    for fig, group_files in figures:
        lines += [f"![{fig.stem}]({fig.name})", "",
                  f"Source files: {', '.join(f'`{f}`' for f in group_files)}", ""]
    quantiles = sorted({q for c in cells for q in c.get("quantile_baselines", {})}, key=float)
    lines += ["## Surrogate selection per cell", "",
              "LDS on test at the lambda chosen without retraining (Algorithm 1 on validation), "
              "at the grid's best lambda (an oracle that needs the ground truth), and at the "
              "spectrum-quantile baselines.", "",
              "| setting | method | fit-stage values | λ selected | LDS there | best LDS of cell | "
              + " | ".join(f"q={q} LDS" for q in quantiles) + " | status |",
              "|---|---|---|---|---|---|" + "---|" * len(quantiles) + "---|"]
    for cell in cells:
        if "surrogate" not in cell:
            continue
        s = cell["surrogate"]
        best = max((r["lds"] for r in cell["rows"] if not math.isnan(r["lds"])), default=float("nan"))
        base = cell.get("quantile_baselines", {})
        qcols = "".join(f" {base[q][1]:.3f} |" if q in base else " — |" for q in quantiles)
        lines.append(f"| {cell['setting']} | {cell['method']} | {_hp_label(cell['fit'])} | "
                     f"{s['lambda']:.3g} | {s['lds']:.3f} | {best:.3f} |{qcols} {s['status']} |")
    failed = [c for c in cells if "error" in c]
    if failed:
        lines += ["", "## Cells that could not run", "", "| setting | method | fit-stage values | why |",
                  "|---|---|---|---|"]
        lines += [f"| {c['setting']} | {c['method']} | {_hp_label(c['fit'])} | {c['error']} |"
                  for c in failed]
    undefined = [c for c in cells if "surrogate_error" in c]
    if undefined:
        lines += ["", "Surrogate undefined (indefinite curvature) for: "
                  + "; ".join(f"{c['setting']}/{c['method']} {_hp_label(c['fit'])}" for c in undefined)]
    lines += ["", "All numbers: `results.csv` (one row per hyperparameter value); raw cells: `cells/`."]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def _plot_pair(out: Path, setting: str, method: str,
               group: list[dict[str, Any]]) -> tuple[Path, list[str]]:
    """LDS against the swept score-stage value (lambda on a log axis when present), one line per
    fit-stage combination, surrogate selections marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cell in group:
        rows = cell["rows"]
        keys = [k for k in rows[0] if k not in ("lds", "sem")]
        label = _hp_label(cell["fit"])
        if not keys:
            ax.scatter([0], [rows[0]["lds"]], label=label)
            continue
        xkey = "lam" if "lam" in keys else keys[0]
        xs = np.array([r[xkey] for r in rows], dtype=float)
        ys = np.array([r["lds"] for r in rows], dtype=float)
        order = np.argsort(xs)
        (line,) = ax.plot(xs[order], ys[order], marker=".", label=label)
        if "surrogate" in cell:
            s = cell["surrogate"]
            ax.scatter([s["lambda"]], [s["lds"]], marker="*", s=140, color=line.get_color(),
                       edgecolor="black", zorder=5)
        ax.set_xlabel(xkey)
        if xkey == "lam" or ((xs > 0).all() and xs.max() / max(xs.min(), 1e-300) > 100):
            ax.set_xscale("log")
    ax.set_ylabel("LDS (test)")
    ax.set_title(f"{setting} / {method}" + ("   (★ surrogate-selected λ)" if any(
        "surrogate" in c for c in group) else ""), fontsize=10)
    ax.legend(fontsize=7)
    path = save_figure(fig, out / f"fig_{setting}_{method}.png")
    return path, [c["file"] for c in group]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = [",".join(keys)]
    for row in rows:
        lines.append(",".join(_csv_value(row.get(k, "")) for k in keys))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _csv_value(value: Any) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    return f'"{text}"' if "," in text else text
