"""Selection rules compared across sweeps (``tdatune rules DIR [DIR ...]``).

Every cell with a spectrum grid and a surrogate selection, from every sweep directory given,
contributes one row: the LDS at the grid best (an oracle), at the lambda each threshold of
Algorithm 1 selects and at each spectrum quantile. For every rule this gives the gap to the
grid best, overall and per (study, setting), and for each threshold on which side of the best
lambda the selection falls. A *calibrated* threshold is judged honestly by leaving one setting
out: the threshold with the smallest mean gap on every other setting is applied to the one
left out, and its gap there is compared with the default threshold's. The default per
attributor chosen out of sample (:mod:`tdatune.study.rule_choice`) and how well the reliability
signal flags the cells it loses (:mod:`tdatune.study.rule_reliability`), and, for cells that
recorded it, the product's own choice, the flow filter and the few-retrain choice measured at
their exact lambdas (:mod:`tdatune.study.recorded_choice`) close the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tdatune.study.figures import write_csv
from tdatune.study.recorded_choice import recorded_lines, recorded_rows
from tdatune.study.report import selection_rows
from tdatune.study.results import load_results
from tdatune.study.rule_choice import choose_defaults, recommend
from tdatune.study.rule_choice_report import choice_lines, choice_rows
from tdatune.study.rule_compare import comparison_lines
from tdatune.study.rule_reliability import judge_signals, reliability_lines, reliability_rows
from tdatune.utils.atomic import atomic_write_text
from tdatune.utils.fingerprint import fingerprint_config


def collect(dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Selection rows of every sweep directory, each tagged with its study (spec name). A cell
    whose selection was already seen in an earlier directory (same setting, ground truth,
    attributor, fit values, grid and rules; the extra lambdas a cell scores do not matter) is
    counted once, under the first study."""
    return collect_cells(dirs)[0]


def collect_cells(dirs: list[str | Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The selection rows of :func:`collect` and, in the same order, their cell records."""
    rows, cells, seen = [], [], set()
    for d in dirs:
        results = load_results(d)
        by_file = {c["file"]: c for c in results.cells}
        for row in selection_rows(results):
            cell = by_file[row["file"]]
            key = fingerprint_config({k: v for k, v in cell["definition"].items()
                                      if k not in ("lambdas", "score")})
            if key in seen:
                continue
            seen.add(key)
            source = cell.get("data_source", "").split(" (")[0]
            rows.append({"study": results.spec.name, **row, "source": source})
            cells.append(cell)
    if not rows:
        raise ValueError("no cell with a spectrum grid and a surrogate selection in "
                         + ", ".join(map(str, dirs)))
    return rows, cells


def thresholds_of(rows: list[dict[str, Any]]) -> list[float]:
    """Thresholds every row was scored at (the rules that can be compared on all rows)."""
    sets = [{float(k[len("lds@"):]) for k in r if k.startswith("lds@") and not k.startswith("lds@q")}
            for r in rows]
    return sorted(set.intersection(*sets))


def quantiles_of(rows: list[dict[str, Any]]) -> list[str]:
    """Quantile baselines every row was scored at."""
    sets = [{k[len("lds@q"):] for k in r if k.startswith("lds@q")} for r in rows]
    return sorted(set.intersection(*sets), key=float)


def gap(row: dict[str, Any], key: str) -> float:
    """Grid-best LDS minus the LDS of the rule stored under ``key``."""
    return float(row["best_lds"] - row[key])


@dataclass
class RuleSummary:
    """One rule's gaps to the grid best over a group of cells."""

    rule: str
    key: str
    cells: int
    mean: float
    median: float
    worst: float


def summarise(rows: list[dict[str, Any]], thresholds: list[float],
              quantiles: list[str]) -> list[RuleSummary]:
    """Mean, median and max gap of every rule over ``rows``."""
    rules = [(f"surrogate xi >= {t:g}", f"lds@{t:g}") for t in thresholds]
    rules += [(f"quantile q = {q}", f"lds@q{q}") for q in quantiles]
    out = []
    for name, key in rules:
        gaps = np.array([gap(r, key) for r in rows])
        out.append(RuleSummary(name, key, len(rows), float(gaps.mean()), float(np.median(gaps)),
                               float(gaps.max())))
    return out


def side(row: dict[str, Any], threshold: float) -> str:
    """``above``, ``below`` or ``at`` (within a factor 1.5): where the selection falls relative
    to the grid-best lambda."""
    ratio = row[f"lam@{threshold:g}"] / row["best_lam"]
    if ratio > 1.5:
        return "above"
    return "below" if ratio < 1 / 1.5 else "at"


def leave_one_setting_out(rows: list[dict[str, Any]], thresholds: list[float],
                          default: float) -> list[dict[str, Any]]:
    """Per setting (by label, over every study that has it): the threshold best on every
    *other* setting, and the gaps of it and of ``default`` on the setting left out."""
    out = []
    for setting in sorted({r["setting"] for r in rows}):
        held = [r for r in rows if r["setting"] == setting]
        rest = [r for r in rows if r["setting"] != setting]
        if not rest:
            continue
        chosen = min(thresholds, key=lambda t: float(np.mean([gap(r, f"lds@{t:g}") for r in rest])))
        out.append({"setting": setting, "cells": len(held),
                    "calibrated_threshold": chosen,
                    "gap_calibrated": float(np.mean([gap(r, f"lds@{chosen:g}") for r in held])),
                    "gap_default": float(np.mean([gap(r, f"lds@{default:g}") for r in held]))})
    return out


def write_rules(dirs: list[str | Path], out: str | Path, default: float = 0.5) -> Path:
    """Write ``rules.md``, ``rules.csv`` (one row per cell), ``rules_by_attributor.csv`` (the
    default per attributor chosen out of sample, one row per fold) and ``rules_reliability.csv``
    (per cell: the default's gap and the reliability signals) into ``out``; return the .md."""
    rows, cells = collect_cells(dirs)
    thresholds, quantiles = thresholds_of(rows), quantiles_of(rows)
    if default not in thresholds:
        raise ValueError(f"the default threshold {default:g} was not scored in every sweep "
                         f"(common thresholds: {', '.join(f'{t:g}' for t in thresholds) or 'none'})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "rules.csv", rows)
    lines = ["# Selection rules across sweeps", "",
             f"{len(rows)} cells (every cell with a spectrum grid and a surrogate selection) from "
             + ", ".join(f"`{d}`" for d in dirs) + ". Gap: LDS at the grid best minus LDS at "
             "the rule's lambda. Per-cell numbers: `rules.csv`.", "",
             "## Every cell", ""]
    lines += _rule_table(summarise(rows, thresholds, quantiles))
    lines += ["", "## Per study and setting: mean gap", ""]
    groups = sorted({(r["study"], r["setting"], r["source"]) for r in rows})
    names = [f"ξ≥{t:g}" for t in thresholds] + [f"q={q}" for q in quantiles]
    lines += ["| study | setting | data | cells | " + " | ".join(names) + " |",
              "|---|---|---|---|" + "---|" * len(names)]
    for study, setting, source in groups:
        held = [r for r in rows if (r["study"], r["setting"]) == (study, setting)]
        gaps = [s.mean for s in summarise(held, thresholds, quantiles)]
        best = min(gaps)
        cols = " | ".join(f"**{g:.3f}**" if g == best else f"{g:.3f}" for g in gaps)
        lines.append(f"| {study} | {setting} | {source} | {len(held)} | {cols} |")
    lines += ["", "## Where the selection falls relative to the best lambda", "",
              "Cells whose selected lambda is more than 1.5x above, within 1.5x of, or more than "
              "1.5x below the grid best.", "", "| threshold | above | at | below |",
              "|---|---|---|---|"]
    for t in thresholds:
        sides = [side(r, t) for r in rows]
        lines.append(f"| {t:g} | {sides.count('above')} | {sides.count('at')} | "
                     f"{sides.count('below')} |")
    loso = leave_one_setting_out(rows, thresholds, default)
    if loso:
        lines += ["", "## A calibrated threshold, left one setting out", "",
                  f"The threshold with the smallest mean gap on all other settings, applied to the "
                  f"one left out, against the default {default:g}.", "",
                  "| setting | cells | calibrated threshold | its gap | gap at default |",
                  "|---|---|---|---|---|"]
        for r in loso:
            lines.append(f"| {r['setting']} | {r['cells']} | "
                         f"{r['calibrated_threshold']:g} | {r['gap_calibrated']:.3f} | "
                         f"{r['gap_default']:.3f} |")
        cal = float(np.mean([r["gap_calibrated"] for r in loso]))
        dft = float(np.mean([r["gap_default"] for r in loso]))
        lines += ["", f"Mean over the {len(loso)} settings left out: calibrated {cal:.3f}, "
                  f"default {dft:.3f}."]
    lines += ["", *comparison_lines(cells)]
    choices = choose_defaults(cells)
    write_csv(out / "rules_by_attributor.csv", choice_rows(choices))
    lines += ["", *choice_lines(choices), "", "Per fold: `rules_by_attributor.csv`."]
    judged = judge_signals(cells, {k: r.candidate for k, r in recommend(choices).items()})
    write_csv(out / "rules_reliability.csv",
              [{"study": r["study"], **x} for r, x in zip(rows, reliability_rows(cells, judged),
                                                           strict=True)])
    lines += ["", *reliability_lines(judged)]
    recorded, _ = recorded_rows(cells)
    if recorded:
        write_csv(out / "rules_recorded.csv", recorded)
        lines += ["", *recorded_lines(cells), "", "Per cell: `rules_recorded.csv`."]
    path = out / "rules.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _rule_table(summaries: list[RuleSummary]) -> list[str]:
    lines = ["| rule | cells | mean gap | median gap | max gap |", "|---|---|---|---|---|"]
    best = min(s.mean for s in summaries)
    for s in summaries:
        mean = f"**{s.mean:.3f}**" if math.isclose(s.mean, best) else f"{s.mean:.3f}"
        lines.append(f"| {s.rule} | {s.cells} | {mean} | {s.median:.3f} | {s.worst:.3f} |")
    return lines
