"""The study's figures, each written with the CSV it was drawn from (``figures/NAME.png`` and
``figures/NAME.csv``):

* ``hp_<method>_<key>``: LDS (standard-error band) against one hyperparameter, one line per
  setting (the sensitivity paper's Figures 1 and 4); log axis for lambda, categorical axes
  for booleans, checkpoint sets and other non-numbers;
* ``pair_<setting>_<method>_<k1>_x_<k2>``: two hyperparameters varied together, as a heatmap
  and as one line per value of the first (projection dim x lambda: the entanglement); with
  ``alpha`` x lambda, the surrogate's lambda is marked on every alpha's curve (Figure 6);
* ``selection_<method>``: LDS against lambda per setting with the surrogate-selected lambda,
  the grid best and the spectrum-quantile baselines marked (Figures 2 and 3);
* ``xi_<method>``: mean surrogate xi on validation against lambda, one line per setting
  (Figure 5), against lambda and against lambda / top eigenvalue.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tdatune.study.plots import _pyplot, save_figure
from tdatune.study.results import SubExperiment, SweepResults, default_value
from tdatune.utils.atomic import atomic_write_text

LOG_KEYS = {"lam", "proj_dim", "depth", "max_iter", "scale", "batch_size", "tol"}
AXIS_NAMES = {"lam": "damping λ (mean-loss scale)", "epoch": "training epoch (checkpoint)",
              "alpha": "subset fraction α", "proj_dim": "projection dim", "max_iter": "CG iterations",
              "depth": "LiSSA depth", "scale": "LiSSA scale", "batch_size": "LiSSA batch size",
              "normalize": "unit-normalised gradients", "checkpoints": "checkpoints"}


def styles(n: int) -> list[dict[str, Any]]:
    """``n`` distinguishable line styles: ten colours, then the same colours with new
    dashes and markers (never two identical lines)."""
    colors = [f"C{i}" for i in range(10)]
    dashes = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    combos = itertools.islice(((c, d, m) for (d, m) in zip(dashes, markers, strict=True)
                               for c in colors), n)
    return [{"color": c, "linestyle": d, "marker": m} for c, d, m in combos]


def numeric_axis(values: Sequence[Any]) -> bool:
    """Whether values are plain numbers (booleans, None, text and sets are categorical)."""
    return all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in values)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as CSV (header = the union of keys in first-seen order), written atomically."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = [",".join(keys)]
    for row in rows:
        lines.append(",".join(_csv_value(row.get(k, "")) for k in keys))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def _csv_value(value: Any) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    return f'"{text}"' if "," in text else text


def _x_axis(ax: Any, key: str, values: list[Any]) -> tuple[bool, list[Any]]:
    """Set up the x axis for ``key``; returns (numeric, categories in order)."""
    ax.set_xlabel(AXIS_NAMES.get(key, key))
    if numeric_axis(values):
        positive = [v for v in values if v > 0]
        if key in LOG_KEYS and len(positive) == len(values) and len(set(values)) > 1 \
                and max(values) / min(values) >= 8:
            ax.set_xscale("log", base=2 if key != "lam" and key != "tol" else 10)
        return True, []
    cats = list(dict.fromkeys(str(v) for v in values))
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=30 if max(len(c) for c in cats) > 6 else 0, fontsize=8)
    return False, cats


def _line(ax: Any, records: list[dict[str, Any]], key: str, numeric: bool, cats: list[str],
          style: dict[str, Any], label: str, y: str = "lds", sem: str = "sem") -> None:
    """``y`` against ``key`` over ``records`` (its finite values), a ± ``sem`` band where the
    records carry one."""
    pts = [(r[key], r[y], r.get(sem, np.nan)) for r in records if np.isfinite(r[y])]
    if not pts:
        return
    if numeric:
        pts.sort(key=lambda p: p[0])
        xs = np.array([p[0] for p in pts], dtype=float)
    else:
        xs = np.array([cats.index(str(p[0])) for p in pts], dtype=float)
    ys = np.array([p[1] for p in pts])
    sem = np.nan_to_num(np.array([p[2] for p in pts], dtype=float))
    ax.plot(xs, ys, label=label, lw=1.6, ms=3.5, **style)
    ax.fill_between(xs, ys - sem, ys + sem, color=style["color"], alpha=0.15, lw=0)


def hyperparameter_figures(results: SweepResults, figdir: Path) -> list[dict[str, Any]]:
    """One figure per (method, varied key) over one-factor sub-experiments, a line per setting."""
    groups: dict[tuple[str, str], list[SubExperiment]] = {}
    for sub in results.experiments:
        if len(sub.keys) == 1 and sub.records:
            groups.setdefault((sub.method, sub.keys[0]), []).append(sub)
    made = []
    plt = _pyplot()
    for (method, key), subs in groups.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        values = [r[key] for s in subs for r in s.records]
        numeric, cats = _x_axis(ax, key, values)
        for sub, style in zip(subs, styles(len(subs)), strict=True):
            _line(ax, sub.records, key, numeric, cats, style, sub.setting)
        default = default_value(results.spec.method(method), key)
        if default is not None and numeric and isinstance(default, int | float) and default > 0:
            ax.axvline(default, color="gray", ls=":", lw=1)
        ax.set_ylabel("LDS (test), ± 1 s.e.")
        ax.set_title(f"{method}: LDS against {key} (others at study defaults)", fontsize=10)
        ax.legend(fontsize=7, title="setting", title_fontsize=7)
        ax.grid(alpha=0.3)
        name = f"hp_{method}_{key}"
        rows = [{"setting": s.setting, "method": method, key: r[key], "lds": r["lds"],
                 "sem": r["sem"], "file": r["file"]} for s in subs for r in s.records]
        made.append(_save(fig, figdir, name, rows,
                          f"LDS against {key} for {method}, one line per setting", subs))
    return made


def pair_figures(results: SweepResults, figdir: Path) -> list[dict[str, Any]]:
    """Two-factor sub-experiments: heatmap (when the grid is rectangular) and lines."""
    made = []
    plt = _pyplot()
    for sub in results.experiments:
        if len(sub.keys) != 2 or not sub.records:
            continue
        k1, k2 = sub.keys
        if k1 == "lam" or (k2 != "lam" and k1 == "alpha"):
            k1, k2 = k2, k1  # lambda (else the second factor) on the x axis
        rows_k1 = list(dict.fromkeys(_key(r[k1]) for r in sub.records))
        xs = list(dict.fromkeys(r[k2] for r in sub.records))
        grid = {(_key(r[k1]), r[k2]): r["lds"] for r in sub.records}
        rectangular = len(grid) == len(rows_k1) * len(xs) == len(sub.records)
        fig, axes = plt.subplots(1, 2 if rectangular else 1, figsize=(11 if rectangular else 6.4, 4.0),
                                 layout="constrained")
        axes = np.atleast_1d(axes)
        ax = axes[-1]
        numeric, cats = _x_axis(ax, k2, [r[k2] for r in sub.records])
        colors = {}
        for value, style in zip(rows_k1, styles(len(rows_k1)), strict=True):
            recs = [r for r in sub.records if _key(r[k1]) == value]
            _line(ax, recs, k2, numeric, cats, style, f"{k1}={value}")
            colors[value] = style["color"]
        if k1 == "alpha" and k2 == "lam":
            _mark_selection_per_alpha(ax, results, sub, colors)
        ax.set_ylabel("LDS (test), ± 1 s.e.")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        if rectangular:
            hm = axes[0]
            z = np.array([[grid[(a, b)] for b in xs] for a in rows_k1], dtype=float)
            image = hm.imshow(z, aspect="auto", cmap="viridis", origin="lower")
            hm.set_xticks(range(len(xs)))
            hm.set_xticklabels([f"{x:.2g}" if isinstance(x, float) else str(x) for x in xs],
                               rotation=45, fontsize=7)
            hm.set_yticks(range(len(rows_k1)))
            hm.set_yticklabels([str(v) for v in rows_k1], fontsize=7)
            hm.set_xlabel(AXIS_NAMES.get(k2, k2))
            hm.set_ylabel(AXIS_NAMES.get(k1, k1))
            best = np.unravel_index(np.nanargmax(z), z.shape) if np.isfinite(z).any() else None
            if best is not None:
                hm.scatter([best[1]], [best[0]], marker="*", s=120, color="red", label="best")
            fig.colorbar(image, ax=hm, label="LDS (test)")
        fig.suptitle(f"{sub.setting} / {sub.method}: {k1} x {k2}", fontsize=10)
        name = f"pair_{sub.setting}_{sub.method}_{k1}_x_{k2}"
        rows = [{"setting": sub.setting, "method": sub.method, k1: r[k1], k2: r[k2],
                 "lds": r["lds"], "sem": r["sem"], "file": r["file"]} for r in sub.records]
        made.append(_save(fig, figdir, name, rows, f"{sub.setting} / {sub.method}: LDS over "
                          f"{k1} x {k2}" + ("" if rectangular else " (lines only: the lambda "
                                            "grids differ by row)"), [sub]))
    return made


def _key(value: Any) -> Any:
    return str(value) if isinstance(value, list) else value


def _mark_selection_per_alpha(ax: Any, results: SweepResults, sub: SubExperiment,
                              colors: dict[Any, str]) -> None:
    """Figure 6: the surrogate's lambda (it does not depend on alpha) on each alpha's curve."""
    for cell_id in dict.fromkeys(r["cell_id"] for r in sub.records):
        cell = results.cell(cell_id)
        if cell and "surrogate" in cell:
            s = cell["surrogate"]
            ax.scatter([s["lambda"]], [s["lds"]], marker="*", s=140, zorder=5, edgecolor="black",
                       color=colors.get(cell["alpha"], "black"))
            ax.axvline(s["lambda"], color="black", lw=0.8, ls=":")
    ax.plot([], [], ls="", marker="*", color="gray", markeredgecolor="black", ms=10,
            label="surrogate λ (same for every α)")


def _lambda_cells(results: SweepResults, method: str) -> list[tuple[str, dict[str, Any]]]:
    """Per setting, the cell of the method's lambda sub-experiment at study defaults."""
    out = []
    for setting in results.spec.settings:
        for sub in results.experiments:
            if sub.setting == setting.label and sub.method == method and sub.keys == ["lam"] \
                    and sub.records:
                cell = results.cell(sub.records[0]["cell_id"])
                if cell and "surrogate" in cell:
                    out.append((setting.label, cell))
                break
    return out


def selection_figures(results: SweepResults, figdir: Path) -> list[dict[str, Any]]:
    """Per eigen method: LDS against lambda per setting, selection and baselines marked."""
    made = []
    plt = _pyplot()
    for method in results.spec.methods:
        panels = _lambda_cells(results, method.label)
        if not panels:
            continue
        ncol = min(3, len(panels))
        nrow = -(-len(panels) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.3 * ncol, 3.3 * nrow), squeeze=False)
        rows = []
        for ax, (setting, cell) in zip(axes.flat, panels, strict=False):
            grid = sorted((r for r in cell["rows"] if r.get("spectrum")), key=lambda r: r["lam"])
            lam = np.array([r["lam"] for r in grid])
            lds = np.array([r["lds"] for r in grid])
            sem = np.nan_to_num(np.array([r["sem"] for r in grid], dtype=float))
            ax.plot(lam, lds, color="C0", lw=1.6)
            ax.fill_between(lam, lds - sem, lds + sem, color="C0", alpha=0.2, lw=0)
            ax.set_xscale("log")
            s = cell["surrogate"]
            ax.axvline(s["lambda"], color="C2", lw=1.5)
            ax.scatter([s["lambda"]], [s["lds"]], marker="*", s=120, color="C2", zorder=5,
                       edgecolor="black", label=f"surrogate ({s['lds']:.3f})")
            if np.isfinite(lds).any():
                b = int(np.nanargmax(lds))
                ax.scatter([lam[b]], [lds[b]], marker="o", s=30, color="black", zorder=4,
                           label=f"grid best ({lds[b]:.3f})")
            for (q, (lam_q, lds_q)), c in zip(cell.get("quantile_baselines", {}).items(),
                                              ["C3", "C1", "C4"], strict=False):
                ax.scatter([lam_q], [lds_q], marker="v", s=40, color=c, zorder=4,
                           label=f"q={q} ({lds_q:.3f})")
            default = cell.get("default_selection")
            if default is not None:
                _mark_default(ax, default)
            ax.set_title(f"{setting}", fontsize=9)
            ax.set_xlabel("λ", fontsize=8)
            ax.set_ylabel("LDS (test)", fontsize=8)
            ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
            rows += [{"setting": setting, "method": method.label, "lam": r["lam"], "lds": r["lds"],
                      "sem": r["sem"], "file": cell["file"]} for r in grid]
            rows.append({"setting": setting, "method": method.label, "lam": s["lambda"],
                         "lds": s["lds"], "sem": s["sem"], "marker": "surrogate",
                         "file": cell["file"]})
            rows += [{"setting": setting, "method": method.label, "lam": lam_q, "lds": lds_q,
                      "marker": f"quantile q={q}", "file": cell["file"]}
                     for q, (lam_q, lds_q) in cell.get("quantile_baselines", {}).items()]
            if default is not None:
                rows.append({"setting": setting, "method": method.label,
                             "lam": default_lambda(default), "lds": default["lds"],
                             "sem": default.get("sem"), "marker": f"default {default['rule']}",
                             "file": cell["file"]})
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"{method.label}: LDS against λ, surrogate λ (threshold "
                     f"{results.spec.threshold}) and spectrum quantiles", fontsize=10)
        fig.tight_layout()
        made.append(_save(fig, figdir, f"selection_{method.label}", rows,
                          f"{method.label}: selection per setting", [], [c["file"] for _, c in panels]))
    return made


def xi_figures(results: SweepResults, figdir: Path) -> list[dict[str, Any]]:
    """Per eigen method: mean xi (validation) against lambda and lambda / top eigenvalue."""
    made = []
    plt = _pyplot()
    for method in results.spec.methods:
        panels = [(s, c) for s, c in _lambda_cells(results, method.label) if "xi_curve" in c]
        if not panels:
            continue
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
        rows = []
        for (setting, cell), style in zip(panels, styles(len(panels)), strict=True):
            xi = cell["xi_curve"]
            lam = np.array(xi["lambdas"])
            mean = np.array(xi["xi_mean"])
            style = {**style, "marker": None}
            a1.plot(lam, mean, label=setting, **style)
            a2.plot(lam / xi["top_eigenvalue"], mean, label=setting, **style)
            a1.axvline(cell["surrogate"]["lambda"], color=style["color"], lw=0.8, ls=":")
            rows += [{"setting": setting, "method": method.label, "lam": x,
                      "lam_over_top": x / xi["top_eigenvalue"], "xi_mean": y, "file": cell["file"]}
                     for x, y in zip(lam.tolist(), mean.tolist(), strict=True)]
        for ax, label in ((a1, "λ"), (a2, "λ / largest eigenvalue")):
            ax.set_xscale("log")
            ax.axhline(results.spec.threshold, color="gray", ls="--", lw=1)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel(label)
            ax.set_ylabel("mean ξ (validation)")
            ax.grid(alpha=0.3)
        a1.legend(fontsize=7)
        fig.suptitle(f"{method.label}: the surrogate indicator across settings "
                     f"(dotted: selected λ)", fontsize=10)
        made.append(_save(fig, figdir, f"xi_{method.label}", rows,
                          f"{method.label}: mean ξ against λ per setting", [],
                          [c["file"] for _, c in panels]))
    return made


def _save(fig: Any, figdir: Path, name: str, rows: list[dict[str, Any]], caption: str,
          subs: list[SubExperiment], files: list[str] | None = None) -> dict[str, Any]:
    png = save_figure(fig, figdir / f"{name}.png")
    csv = write_csv(figdir / f"{name}.csv", rows)
    sources = files if files is not None else sorted({r["file"] for s in subs for r in s.records})
    return {"png": png, "csv": csv, "caption": caption, "sources": sorted(set(sources))}


def all_figures(results: SweepResults) -> list[dict[str, Any]]:
    """Every figure kind the sweep's sub-experiments allow, under ``out/figures``."""
    figdir = results.out / "figures"
    return (hyperparameter_figures(results, figdir) + pair_figures(results, figdir)
            + selection_figures(results, figdir) + xi_figures(results, figdir))


def default_lambda(default: dict[str, Any]) -> float:
    """A cell's default damping as one number: the lambda, or for one per layer the geometric
    mean of the layers' (where a figure marks it)."""
    lam = default["lambda"]
    if isinstance(lam, list):
        return float(np.exp(np.mean(np.log(np.asarray(lam, dtype=float)))))
    return float(lam)


def _mark_default(ax: Any, default: dict[str, Any]) -> None:
    """The product's default damping on a selection panel: a diamond at its lambda, or for one
    per layer a bar across the layers' lambdas at its LDS."""
    lam, lds = default["lambda"], default["lds"]
    label = f"default {default['rule']} ({lds:.3f})"
    if isinstance(lam, list):
        ax.hlines(lds, min(lam), max(lam), color="C5", lw=2.5, zorder=5, label=label)
    else:
        ax.scatter([lam], [lds], marker="D", s=40, color="C5", edgecolor="black", zorder=5,
                   label=label)
