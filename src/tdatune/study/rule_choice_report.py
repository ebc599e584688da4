"""The section "Per attributor, chosen out of sample" of ``rules.md`` and its CSV rows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tdatune.study.rule_candidates import ATTRIBUTOR_NAMES, CLAMP_DECADES, CandidateGaps
from tdatune.study.rule_choice import (
    MIN_SETTINGS,
    Choices,
    GroupChoice,
    mean_worst,
    recommend,
    recommended_gaps,
)

LOSS_MARGIN = 0.03  # a held-out setting whose mean gap exceeds this is named in the report

INTRO = (
    "{n} candidate rules, each computable from what a cell stores: the spectrum quantile q "
    "(0.5 - 0.95), c x top eigenvalue (c from 1e-12 to 0.1 in half decades), c x mean "
    "eigenvalue (1e-6 to 10), xi >= t (the stored thresholds 0.3 - 0.7), one damping per block "
    "(0.1 x each block's mean; on a one-block cell 0.1 x the mean), and the training-recipe rule "
    "(**a crude hypothesis being tested, not a derivation**: weight_decay + (1 - momentum) / "
    "(lr x steps) for SGD, weight_decay for L-BFGS, sqrt(mean eigenvalue / batch_size) / "
    "(lr x steps) + weight_decay for Adam; steps = epochs x ceil(n_train / batch_size)). "
    "**Nested leave one setting out**: for each attributor and each setting held out (with all "
    "its training seeds), the rule and constant with the smallest mean gap on that attributor's "
    "cells of the *other* settings is applied to the held-out cells. `q = 0.9`: the global "
    "default on the same cells. `by kind`: the same choice made over the attributor's family "
    "(eigen-kernel: IFFIM, TRAK, LoGra, IF explicit; Kronecker: K-FAC, EK-FAC; truncated: "
    "Arnoldi), judged on this attributor's cells. `in sample`: the rule chosen on all settings, "
    "with its in-sample gap. A lambda outside a cell's grid is clamped to the grid's end "
    "(`clamped`: held-out cells where the fold's rule lay more than {clamp:g} decade outside); a "
    "cell without what a rule needs gets the 0.9 quantile (`fell back`: older cells without "
    "spectrum statistics). `losing > {loss:g}`: held-out settings whose mean out-of-sample gap "
    "exceeds it.")


def _fmt(pair: tuple[float, float]) -> str:
    return "–" if not np.isfinite(pair[0]) else f"{pair[0]:.3f} / {pair[1]:.3f}"


def _name(attributor: str) -> str:
    return ATTRIBUTOR_NAMES.get(attributor, attributor)


def fold_summary(choice: GroupChoice, t: CandidateGaps) -> str:
    """The rules chosen in a group's folds, each followed by the settings held out under it."""
    by_rule: dict[str, list[str]] = {}
    for fold in choice.folds:
        rule = "no other setting" if fold.choice is None else t.candidates[fold.choice].label
        by_rule.setdefault(rule, []).append(fold.held_out)
    return "; ".join(f"{rule} ({', '.join(held)})" for rule, held in by_rule.items())


def losing_settings(choice: GroupChoice) -> str:
    """Held-out settings whose mean out-of-sample gap exceeds ``LOSS_MARGIN``."""
    out = []
    for fold in choice.folds:
        g = choice.oos[fold.cells]
        if np.isfinite(g).any() and np.nanmean(g) > LOSS_MARGIN:
            out.append(f"{fold.held_out} {np.nanmean(g):.3f}")
    return ", ".join(out) or "none"


def flagged(choice: GroupChoice, flags: np.ndarray) -> int:
    """Held-out cells on which the fold's chosen rule is flagged (clamped or fell back)."""
    return int(sum(flags[f.choice, f.cells].sum() for f in choice.folds if f.choice is not None))


def attributor_lines(ch: Choices) -> list[str]:
    """One row per attributor: the folds, the out-of-sample gaps, the global default's."""
    t = ch.table
    lines = ["| attributor | cells | settings | rule chosen per fold (held-out settings) | out of "
             "sample mean / worst | q = 0.9 mean / worst | by kind, out of sample | losing > "
             f"{LOSS_MARGIN:g} | clamped / fell back | in sample: rule, mean / worst |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, choice in ch.by_attributor.items():
        m = choice.members
        lines.append(
            f"| {_name(name)} | {len(m)} | {len(choice.folds)} | {fold_summary(choice, t)} | "
            f"{_fmt(mean_worst(choice.oos[m]))} | {_fmt(mean_worst(t.gaps[0, m]))} | "
            f"{_fmt(mean_worst(ch.kind_choice(name).oos[m]))} | {losing_settings(choice)} | "
            f"{flagged(choice, t.clamped)} / {flagged(choice, t.fallback)} | "
            f"{t.candidates[choice.overall].label}, "
            f"{_fmt(mean_worst(t.gaps[choice.overall, m]))} |")
    return lines


def kind_lines(ch: Choices) -> list[str]:
    """One row per family of attributors."""
    t = ch.table
    lines = ["| kind | cells | rule chosen per fold (held-out settings) | out of sample mean / "
             "worst | q = 0.9 mean / worst | losing > 0.03 | in sample: rule |",
             "|---|---|---|---|---|---|---|"]
    for name, choice in ch.by_kind.items():
        m = choice.members
        lines.append(f"| {name} | {len(m)} | {fold_summary(choice, t)} | "
                     f"{_fmt(mean_worst(choice.oos[m]))} | {_fmt(mean_worst(t.gaps[0, m]))} | "
                     f"{losing_settings(choice)} | {t.candidates[choice.overall].label} |")
    return lines


def recommendation_lines(ch: Choices) -> list[str]:
    """The recommended default per attributor, as a table and as a mapping for code."""
    recs = recommend(ch)
    together = mean_worst(recommended_gaps(ch, recs))
    lines = ["| attributor | default | from | its out of sample mean / worst | q = 0.9 mean / "
             "worst |", "|---|---|---|---|---|"]
    for name, r in recs.items():
        lines.append(f"| {_name(name)} | {r.candidate.label} | {r.source} | {_fmt(r.oos)} | "
                     f"{_fmt(r.default)} |")
    code = ", ".join(f'"{n}": ("{r.candidate.family}", {r.candidate.constant!r})'
                     for n, r in recs.items())
    return [*lines, "", f"Together, out of sample over all {ch.table.gaps.shape[1]} cells: "
            f"{_fmt(together)}, against {_fmt(mean_worst(ch.table.gaps[0]))} for the 0.9 quantile "
            "everywhere.", "", f"As a mapping: `{{{code}}}`."]


def recipe_line(ch: Choices) -> str:
    """The recipe rule's own gaps per attributor and how often a fold chose it (empty when it
    is not among the candidates)."""
    t = ch.table
    i = next((k for k, c in enumerate(t.candidates) if c.family == "recipe"), None)
    if i is None:
        return ""
    folds = [f for g in ch.by_attributor.values() for f in g.folds if f.choice is not None]
    parts = [f"{_name(a)} {_fmt(mean_worst(t.gaps[i, ch.attributors == a]))}"
             for a in ch.by_attributor]
    return (f"The training-recipe rule (a hypothesis under test) was chosen in "
            f"{sum(f.choice == i for f in folds)} of {len(folds)} per-attributor folds; its own "
            "gap, mean / worst: " + "; ".join(parts) + f". Clamped on {int(t.clamped[i].sum())} "
            f"of {t.gaps.shape[1]} cells, fell back on {int(t.fallback[i].sum())}.")


def clamp_line(ch: Choices) -> str:
    """How often each family of candidates was clamped to a grid end."""
    t = ch.table
    most: dict[str, tuple[int, str]] = {}
    for k, c in enumerate(t.candidates):
        n = int(t.clamped[k].sum())
        if n > most.get(c.family, (0, ""))[0]:
            most[c.family] = (n, c.label)
    parts = [f"{n} ({label})" for n, label in most.values()]
    return (f"Clamped to a grid end, of {t.gaps.shape[1]} cells, for the constant of each family "
            "clamped most often: " + ("; ".join(parts) or "none") + ".")


def choice_lines(ch: Choices) -> list[str]:
    """The report section "Per attributor, chosen out of sample" (markdown lines)."""
    return ["## Per attributor, chosen out of sample", "",
            INTRO.format(n=len(ch.table.candidates), clamp=CLAMP_DECADES, loss=LOSS_MARGIN), "",
            *attributor_lines(ch), "",
            "By family of attributors (the same nested choice over the family's cells):", "",
            *kind_lines(ch), "",
            "**Recommended default per attributor**: the per-attributor or per-kind choice (made "
            "on all settings) with the smaller out-of-sample mean among those that beat the 0.9 "
            f"quantile in both mean and worst on at least {MIN_SETTINGS} settings, else the 0.9 "
            "quantile (a choice made on the out-of-sample numbers themselves: the gain is "
            "slightly optimistic).", "", *recommendation_lines(ch), "",
            recipe_line(ch), "", clamp_line(ch)]


def choice_rows(ch: Choices) -> list[dict[str, Any]]:
    """One CSV row per fold (per attributor and per kind), and one per group for the choice
    made on all its settings (``held_out`` = ``(in sample)``)."""
    rows = []
    for grouping, groups in (("attributor", ch.by_attributor), ("kind", ch.by_kind)):
        for name, choice in groups.items():
            for fold in choice.folds:
                rows.append(_row(ch.table, grouping, name, fold.held_out, fold.choice, fold.cells))
            rows.append(_row(ch.table, grouping, name, "(in sample)", choice.overall,
                             choice.members))
    return rows


def _row(t: CandidateGaps, grouping: str, group: str, held_out: str, choice: int | None,
         cells: np.ndarray) -> dict[str, Any]:
    """A CSV row: a fold's choice and its gaps, against the global default's."""
    cand = None if choice is None else t.candidates[choice]
    gaps = np.full(len(cells), math.nan) if choice is None else t.gaps[choice, cells]
    mean, worst = mean_worst(gaps)
    d_mean, d_worst = mean_worst(t.gaps[0, cells])
    return {"grouping": grouping, "group": group, "held_out": held_out, "cells": len(cells),
            "rule": "" if cand is None else cand.label,
            "family": "" if cand is None else cand.family,
            "constant": "" if cand is None or cand.constant is None else cand.constant,
            "mean_gap": mean, "worst_gap": worst, "q0.9_mean_gap": d_mean,
            "q0.9_worst_gap": d_worst,
            "clamped": 0 if choice is None else int(t.clamped[choice, cells].sum()),
            "fell_back": 0 if choice is None else int(t.fallback[choice, cells].sum())}
