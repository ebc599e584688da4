"""Tables, figures and a Markdown report from a sweep directory (``tdatune report DIR``).

Everything is drawn from the cells that answer the directory's current spec (see
:mod:`tdatune.study.results`); failed, stale and missing cells are listed, never used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tdatune.study.beyond_factors import factor_figures, factor_rows, factor_summary, factor_table
from tdatune.study.beyond_report import beyond_figures, beyond_rows, beyond_table
from tdatune.study.figures import all_figures, default_lambda, write_csv
from tdatune.study.results import SweepResults, is_default, load_results
from tdatune.utils.atomic import atomic_write_text

SENSITIVE = 0.1  # an LDS range this large is called sensitive (bold in the report)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _hp_label(fit: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(fit.items())) or "defaults"


def flatten_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (cell, score-stage value) with setting, method, alpha and all hyperparameters."""
    rows = []
    for cell in cells:
        for row in cell["rows"]:
            rows.append({"setting": cell["setting"], "method": cell["method"],
                         "attributor": cell["attributor"], "alpha": cell["alpha"], **cell["fit"],
                         **row, "n_explained": cell.get("n_explained", ""),
                         "file": cell["file"]})
    return rows


def sensitivity_rows(results: SweepResults) -> list[dict[str, Any]]:
    """Per (setting, method, hyperparameter) of a one-factor sub-experiment: the LDS range when
    only that hyperparameter moves, where it peaks, and the LDS at the study default."""
    out = []
    for sub in results.experiments:
        finite = [r for r in sub.records if np.isfinite(r["lds"])]
        if len(sub.keys) != 1 or not finite:
            continue
        key = sub.keys[0]
        best = max(finite, key=lambda r: r["lds"])
        worst = min(finite, key=lambda r: r["lds"])
        method = results.spec.method(sub.method)
        at_default = [r["lds"] for r in finite
                      if is_default(results.spec, sub.setting, method, key, r[key])]
        out.append({"setting": sub.setting, "method": sub.method, "hyperparameter": key,
                    "values": len(finite), "lds_min": worst["lds"], "lds_max": best["lds"],
                    "range": best["lds"] - worst["lds"], "best_at": best[key], "worst_at": worst[key],
                    "lds_at_default": at_default[0] if at_default else float("nan"),
                    "missing_points": sub.missing})
    return out


def selection_rows(results: SweepResults) -> list[dict[str, Any]]:
    """Per eigen cell with a selection and a spectrum grid: selected lambda and LDS at each
    threshold, the grid best (an oracle that needs the ground truth), and the spectrum-quantile
    baselines. Cells scored at a few listed lambdas only have no oracle to compare with."""
    out = []
    for cell in results.cells:
        finite = [r for r in cell["rows"] if r.get("spectrum") and np.isfinite(r["lds"])]
        if "selections" not in cell or not finite:
            continue
        best = max(finite, key=lambda r: r["lds"]) if finite else None
        row = {"setting": cell["setting"], "method": cell["method"], "alpha": cell["alpha"],
               "fit": _hp_label(cell["fit"]), "best_lds": best["lds"] if best else float("nan"),
               "best_lam": best["lam"] if best else float("nan"),
               "status": cell["surrogate"]["status"], "n_dropped": cell["surrogate"]["n_dropped"],
               "file": cell["file"]}
        for s in cell["selections"]:
            row[f"lam@{s['threshold']:g}"] = s["lambda"]
            row[f"lds@{s['threshold']:g}"] = s["lds"]
        for q, (_, lds_q) in cell.get("quantile_baselines", {}).items():
            row[f"lds@q{q}"] = lds_q
        default = cell.get("default_selection")
        if default is not None:
            row |= {"default_rule": default["rule"], "default_lam": default_lambda(default),
                    "default_lds": default["lds"]}
        out.append(row)
    return out


def write_report(out: str | Path) -> Path:
    """Write ``results.csv``, the tables' CSVs, ``figures/`` and ``report.md`` into ``out``."""
    results = load_results(out)
    out = results.out
    spec = results.spec
    write_csv(out / "results.csv", flatten_rows(results.cells))
    sens = sensitivity_rows(results)
    write_csv(out / "sensitivity.csv", sens)
    sel = selection_rows(results)
    write_csv(out / "selection.csv", sel)
    beyond = beyond_rows(results)
    if beyond:
        write_csv(out / "beyond.csv", beyond)
    factors = factor_rows(results)
    summary = factor_summary(factors)
    if factors:
        write_csv(out / "beyond_factors.csv", factors)
        write_csv(out / "beyond_factors_summary.csv", summary)
    figures = (all_figures(results) + beyond_figures(results, out / "figures")
               + factor_figures(factors, out / "figures"))

    lines = [f"# Sweep report: {spec.name}", ""]
    lines += _overview(results)
    lines += ["## Sensitivity: the LDS range when only one hyperparameter moves", "",
              "Every other hyperparameter at the study default (Appendix A.1 of the sensitivity "
              "paper unless the spec overrides it). Bold: a range of 0.1 or more. Source: "
              "`sensitivity.csv`.", "",
              "| setting | method | hyperparameter | values | LDS min | LDS max | range | best at "
              "| LDS at default |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sens:
        lines.append(f"| {r['setting']} | {r['method']} | {r['hyperparameter']} | {r['values']} | "
                     f"{r['lds_min']:.3f} | {r['lds_max']:.3f} | {_range(r['range'])} | "
                     f"{_fmt(r['best_at'])} | {_num(r['lds_at_default'])} |")
    if sel:
        lines += _selection_tables(results, sel)
    lines += beyond_table(beyond, spec.threshold)
    lines += factor_table(summary)
    lines += ["", "## Figures", ""]
    for fig in figures:
        lines += [f"### {fig['png'].stem}", "", fig["caption"] + ".", "",
                  f"![{fig['png'].stem}](figures/{fig['png'].name})", "",
                  f"Data: `figures/{fig['csv'].name}`; cells: "
                  + ", ".join(f"`{f}`" for f in fig["sources"][:12])
                  + (f" and {len(fig['sources']) - 12} more" if len(fig["sources"]) > 12 else ""), ""]
    lines += _problems(results)
    lines += ["", "All numbers: `results.csv` (one row per hyperparameter value of every current "
              "cell); raw cells: `cells/`."]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def _num(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _range(value: float) -> str:
    return f"**{value:.3f}**" if value >= SENSITIVE else f"{value:.3f}"


def _overview(results: SweepResults) -> list[str]:
    spec = results.spec
    gt = spec.groundtruth
    cells = results.cells
    sources = {c["setting"]: c.get("data_source", "") for c in cells}
    quality = {c["setting"]: c["model_quality"] for c in cells if "model_quality" in c}
    lines = [f"Ground truth: {gt.n_subsets} subsets x {gt.seeds_per_subset} seed(s), alpha "
             f"{gt.alpha} (unless a sub-experiment varies it); selection threshold "
             f"{spec.threshold}; {len(cells)} current cells, {len(results.failed)} failed, "
             f"{len(results.stale)} stale, {len(results.missing)} not run.", "",
             "| setting | built on | data | train/val/test | recipe overrides | model options | "
             "test accuracy | test loss |", "|---|---|---|---|---|---|---|---|"]
    for s in spec.settings:
        definition = s.definition(spec.seed, spec.data_dir)
        lines.append(f"| {s.label} | {s.name} | {sources.get(s.label, '—')} | "
                     f"{'/'.join(map(str, definition['sizes']))} | {s.recipe or '—'} | "
                     f"{s.model or '—'} | {_num(quality.get(s.label, {}).get('test_accuracy'))} | "
                     f"{_num(quality.get(s.label, {}).get('test_loss'))} |")
    envs = sorted({", ".join(f"{k} {e[k]}" for k in ("torch", "threads", "blas", "cpu_capability",
                                                        "device") if k in e)
                   for c in cells if (e := c.get("environment"))})
    if envs:
        lines += ["", "Numeric environment of the cells (not part of their identity; a chaotic "
                  "model's numbers move with the thread count): " + "; ".join(envs) + "."]
    seconds = sum(c.get("fit_seconds", 0) + c.get("score_seconds", 0) for c in cells)
    lines += ["", f"Attribution time over all current cells: {seconds:.0f} s (fit + score; "
              "training and ground truth not included).", ""]
    subset = [f"{m.label} explains the first {m.explain}" for m in spec.methods if m.explain]
    if subset:
        lines += [f"Test examples: {'; '.join(subset)} (its LDS is the mean over those); every "
                  "other method explains the whole test split.", ""]
    return lines


def _selection_tables(results: SweepResults, sel: list[dict[str, Any]]) -> list[str]:
    spec = results.spec
    quantiles = sorted({k[len("lds@q"):] for r in sel for k in r if k.startswith("lds@q")}, key=float)
    t = f"{spec.threshold:g}"
    lines = ["", "## Surrogate selection per cell", "",
             "LDS on test at the lambda chosen without retraining (Algorithm 1 on validation), "
             "at the best lambda of the cell's grid (an oracle that needs the ground truth), and at "
             "the spectrum-quantile baselines. Source: `selection.csv`.", "",
             "| setting | method | α | fit-stage values | default rule | LDS there | λ selected (ξ) "
             "| LDS there | best LDS | gap (ξ) | "
             + " | ".join(f"q={q}" for q in quantiles) + " | status |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(quantiles) + "---|"]
    for r in sel:
        qcols = "".join(f" {_num(r.get(f'lds@q{q}'))} |" for q in quantiles)
        lines.append(f"| {r['setting']} | {r['method']} | {r['alpha']:g} | {r['fit']} | "
                     f"{r.get('default_rule', '—')} | {_num(r.get('default_lds'))} | "
                     f"{r[f'lam@{t}']:.3g} | {r[f'lds@{t}']:.3f} | {r['best_lds']:.3f} | "
                     f"{r['best_lds'] - r[f'lds@{t}']:.3f} |{qcols} {r['status']} |")
    if len(spec.thresholds) > 1 or quantiles:
        lines += ["", "### Gap to the grid best, by rule (over every cell above)", "",
                  "| rule | mean gap | median gap | max gap |", "|---|---|---|---|"]
        rules = [("default (the attributor's own rule)", "default_lds")]
        rules += [(f"surrogate ξ ≥ {x:g}", f"lds@{x:g}") for x in spec.thresholds]
        rules += [(f"quantile q = {q}", f"lds@q{q}") for q in quantiles]
        for name, key in rules:
            gaps = np.array([r["best_lds"] - r[key] for r in sel if key in r])
            if gaps.size:
                lines.append(f"| {name} | {gaps.mean():.3f} | {np.median(gaps):.3f} | "
                             f"{gaps.max():.3f} |")
    return lines


def _problems(results: SweepResults) -> list[str]:
    lines: list[str] = []
    if results.failed:
        lines += ["", "## Cells that failed (rerun the sweep to retry them)", "",
                  "| cell | setting | method | fit-stage values | error |", "|---|---|---|---|---|"]
        lines += [f"| `{c['file']}` | {c['setting']} | {c['method']} | {_hp_label(c['fit'])} | "
                  f"{c['error'].splitlines()[0][:300]} |" for c in results.failed]
    errors = [(c, r) for c in results.cells for r in c["rows"] if "error" in r]
    if errors:
        lines += ["", "## Hyperparameter values that could not be scored", "",
                  "| setting | method | values | why |", "|---|---|---|---|"]
        lines += [f"| {c['setting']} | {c['method']} | "
                  f"{_hp_label({k: v for k, v in r.items() if k not in ('lds', 'sem', 'error')})} | "
                  f"{r['error'][:300]} |" for c, r in errors]
    undefined = [c for c in results.cells if "surrogate_error" in c]
    if undefined:
        lines += ["", "Surrogate undefined (indefinite curvature) for: "
                  + "; ".join(f"{c['setting']}/{c['method']} {_hp_label(c['fit'])}" for c in undefined)]
    if results.stale or results.missing:
        lines += ["", f"Not shown: {len(results.stale)} cell(s) whose definition changed since they "
                  f"were computed and {len(results.missing)} never run; rerun `tdatune sweep` on this "
                  "directory to compute them."]
    if results.damaged:
        lines += ["", "Damaged cell files (unreadable; rerun `tdatune sweep` to recompute them): "
                  + "; ".join(f"`{d}`" for d in results.damaged)]
    if results.legacy:
        lines += ["", f"{len(results.legacy)} cell(s) were computed by an older tdatune (cell "
                  "format 2) that did not record the trained model and ground truth they came "
                  "from; every field they did record matches the spec. `tdatune sweep` on this "
                  "directory records today's."]
    if results.orphans:
        lines += ["", f"Ignored: {len(results.orphans)} file(s) in `cells/` that belong to no cell of "
                  "the current spec (left from an earlier spec)."]
    return lines
