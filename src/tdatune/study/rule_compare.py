"""Selection rules judged out of sample over stored cells.

Every rule is applied to a cell's stored data (its validation xi curve, spectrum statistics and
LDS grid) and its LDS is read off the cell's grid by linear interpolation in log lambda, the
same way for every rule. A rule with a free constant (a threshold t, a quantile q, a factor c of
the top or of the mean eigenvalue) is judged **leaving one setting out**: for each setting, the
constant with the smallest mean gap on every *other* setting is applied to it. Fixed rules
(t = 0.5, q = 0.9, 0.01 x top, 0.1 x mean) are reported as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from tdatune.evaluate.condition import ConditionCurves, decompose, first_crossing
from tdatune.select.reliability import DISTANCE_MAX, REFERENCE_QUANTILE, crossing_slope

Cell = dict[str, Any]
Rule = Callable[[Cell], float | None]

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(2, 19))        # 0.10 ... 0.90
FACTORS = tuple(10.0 ** (e / 4) for e in range(-24, 5))             # 1e-6 ... 10
FAMILIES = (("bert", "BERT"), ("gpt", "GPT"), ("music", "music"), ("resnet", "ResNet"),
            ("mlp", "MLP"), ("lr", "LR"))


def family(setting_name: str) -> str:
    """The model family of a setting name (LR, MLP, ResNet, GPT, music, BERT, other)."""
    return next((f for key, f in FAMILIES if key in setting_name), "other")


def grid_of(cell: Cell) -> tuple[np.ndarray, np.ndarray]:
    """The cell's spectrum-grid lambdas and LDS (finite points, sorted)."""
    rows = sorted((r["lam"], r["lds"]) for r in cell["rows"]
                  if r.get("spectrum") and np.isfinite(r["lds"]))
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


def best_lds(cell: Cell) -> float:
    """The cell's grid-best LDS (the oracle every gap is measured from)."""
    return float(grid_of(cell)[1].max())


def lds_at(cell: Cell, lam: float) -> float:
    """The cell's LDS at ``lam``, interpolated linearly in log lambda (clamped to the grid)."""
    grid, lds = grid_of(cell)
    return float(np.interp(math.log(lam), np.log(grid), lds))


def curve_crossing(curve: dict[str, Any] | None, t: float) -> float | None:
    """The first crossing of ``t`` by a stored mean-indicator curve (NaN points count as 0),
    the curve's last lambda when it never crosses, None without a curve."""
    if not curve:
        return None
    lam = np.array(curve["lambdas"], dtype=np.float64)
    values = np.nan_to_num(np.array(curve["xi_mean"], dtype=np.float64), nan=0.0)
    at = first_crossing(lam, values, t)
    return float(lam[-1]) if math.isnan(at) else at  # never reached


def xi_rule(t: float) -> Rule:
    """Algorithm 1 at threshold ``t``: the stored selection if the cell ran at ``t``, else the
    first crossing of its stored validation mean-xi curve."""
    def rule(cell: Cell) -> float | None:
        stored = next((s["lambda"] for s in cell.get("selections", [])
                       if math.isclose(s["threshold"], t)), None)
        return float(stored) if stored is not None else curve_crossing(cell.get("xi_curve"), t)
    return rule


def centered_rule(t: float) -> Rule:
    """The first crossing of ``t`` by the stored validation mean of xi_c (the centred
    indicator); the grid's last lambda when it never crosses."""
    return lambda cell: curve_crossing(cell.get("xi_centered_curve"), t)


def quantile_rule(q: float) -> Rule:
    """The q-quantile of the validation spectrum."""
    def rule(cell: Cell) -> float | None:
        stats = cell.get("spectrum_stats", {}).get("quantiles", {})
        if f"{q:g}" in stats:
            return float(stats[f"{q:g}"])
        old = cell.get("quantile_baselines", {}).get(f"{q:g}")
        return None if old is None else float(old[0])
    return rule


def top_rule(c: float) -> Rule:
    """c x the top eigenvalue of the validation spectrum."""
    def rule(cell: Cell) -> float | None:
        curve = cell.get("xi_curve")
        return None if not curve else c * float(curve["top_eigenvalue"])
    return rule


def mean_rule(c: float) -> Rule:
    """c x the mean eigenvalue of the validation spectrum (Kronfluence's heuristic with c = 0.1,
    applied to the whole matrix)."""
    def rule(cell: Cell) -> float | None:
        stats = cell.get("spectrum_stats")
        return None if not stats else c * float(stats["mean"])
    return rule


@dataclass
class RuleFamily:
    """Rules that differ by one constant; ``fixed`` is the constant quoted as the plain rule."""

    name: str
    make: Callable[[float], Rule]
    constants: tuple[float, ...]
    fixed: float
    label: Callable[[float], str]
    new_cells_only: bool = False  # constants that only cells with spectrum statistics store


RULE_FAMILIES = (
    RuleFamily("xi threshold", xi_rule, THRESHOLDS, 0.5, lambda t: f"xi >= {t:g}"),
    RuleFamily("centred xi threshold", centered_rule, THRESHOLDS, 0.5,
               lambda t: f"centred xi_c >= {t:g}"),
    RuleFamily("spectrum quantile", quantile_rule, (0.1, 0.5, 0.9), 0.9, lambda q: f"q = {q:g}"),
    RuleFamily("spectrum quantile (0.05 steps; new cells)", quantile_rule,
               tuple(round(0.05 * i, 2) for i in range(1, 20)), 0.9, lambda q: f"q = {q:g}",
               new_cells_only=True),
    RuleFamily("c x top eigenvalue", top_rule, FACTORS, 0.01, lambda c: f"{c:.3g} x top"),
    RuleFamily("c x mean eigenvalue", mean_rule, FACTORS, 0.1, lambda c: f"{c:.3g} x mean"),
)


def cell_gaps(cells: list[Cell], rule: Rule) -> np.ndarray:
    """Grid-best LDS minus the LDS at the rule's lambda, per cell (NaN where it does not apply)."""
    out = []
    for cell in cells:
        lam = rule(cell)
        out.append(math.nan if lam is None or not lam > 0
                   else best_lds(cell) - lds_at(cell, lam))
    return np.array(out)


def loso(cells: list[Cell], fam: RuleFamily, key: Callable[[Cell], str]) -> tuple[np.ndarray,
                                                                                   dict[str, float]]:
    """Out-of-sample gaps of a rule family: per group (setting) left out, the constant with the
    smallest mean gap on the others. Returns gaps per cell and the constant per group."""
    table = np.stack([cell_gaps(cells, fam.make(c)) for c in fam.constants])  # [C, cells]
    groups = np.array([key(c) for c in cells])
    gaps = np.full(len(cells), math.nan)
    chosen: dict[str, float] = {}
    for g in sorted(set(groups)):
        held, rest = groups == g, groups != g
        if not rest.any():
            continue
        with np.errstate(invalid="ignore"):
            means = np.array([np.nanmean(row) if np.isfinite(row).any() else np.inf
                              for row in table[:, rest]])
        i = int(np.argmin(means))
        chosen[g] = fam.constants[i]
        gaps[held] = table[i, held]
    return gaps, chosen


def reliability_signals(cell: Cell, threshold: float = 0.5) -> dict[str, float]:
    """The retraining-free signals of the selection at ``threshold``: slope of the stored mean-xi
    curve at the crossing, distance in decades to the spectrum's 0.9 quantile, and (new cells)
    the spread of the per-example crossings."""
    curve = cell.get("xi_curve")
    lam = xi_rule(threshold)(cell)
    reference = quantile_rule(REFERENCE_QUANTILE)(cell)
    if not curve or lam is None:
        return {}
    out = {"slope": crossing_slope(np.array(curve["lambdas"]), np.array(curve["xi_mean"]),
                                   threshold),
           "distance": math.nan if reference is None else abs(math.log10(lam / reference))}
    stored = next((s.get("reliability") for s in cell.get("selections", [])
                   if math.isclose(s["threshold"], threshold)), None)
    stored = stored or cell.get("reliability", {}).get(f"{threshold:g}")  # first study cells
    if stored:
        out["spread"] = float(stored["spread"])
    return out


def rank_correlation(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Spearman correlation over the pairs where both are finite, and how many pairs."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return math.nan, int(ok.sum())
    return float(spearmanr(x[ok], y[ok]).statistic), int(ok.sum())


def _fmt(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{x:.3f}"


def _mean_max(g: np.ndarray) -> str:
    g = g[np.isfinite(g)]
    return "–" if g.size == 0 else f"{g.mean():.3f} / {g.max():.3f}"


def setting_key(cell: Cell) -> str:
    """The group a setting is left out by: its setting name (a user task's label, since its
    name is the ``module:function`` it was built by)."""
    name = str(cell.get("setting_name") or cell["setting"])
    return str(cell["setting"]) if ":" in name else name


def seed_of(cell: Cell) -> int:
    """The training seed the cell's setting was trained with."""
    return int(cell.get("definition", {}).get("setting", {}).get("seed", 0))


def candidate_gaps(cells: list[Cell]) -> dict[str, np.ndarray]:
    """Gaps per cell of every fixed rule and every rule family left one setting out."""
    out: dict[str, np.ndarray] = {}
    for fam in RULE_FAMILIES:
        if not fam.new_cells_only:
            out[fam.label(fam.fixed)] = cell_gaps(cells, fam.make(fam.fixed))
    new = np.array(["spectrum_stats" in c for c in cells])
    for fam in RULE_FAMILIES:
        gaps = np.full(len(cells), math.nan)
        if fam.new_cells_only:
            if new.any():
                gaps[new] = loso([c for c, k in zip(cells, new, strict=True) if k], fam,
                                 setting_key)[0]
        else:
            gaps = loso(cells, fam, setting_key)[0]
        out[f"{fam.name}, left one setting out"] = gaps
    out["per-block 0.1 x block mean"] = np.array(
        [best_lds(c) - c["blockwise"]["heuristic"]["lds"] if "blockwise" in c else math.nan
         for c in cells])
    out["per-block xi >= 0.5"] = np.array(
        [best_lds(c) - c["blockwise"]["xi"]["lds"] if "blockwise" in c else math.nan
         for c in cells])
    return out


def comparison_lines(cells: list[Cell]) -> list[str]:
    """The out-of-sample comparison, the spread over training seeds, the diagnosis, the
    reliability signals and the few-retrain calibration, as markdown."""
    fams = sorted({family(setting_key(c)) for c in cells})
    by_family = np.array([family(setting_key(c)) for c in cells])
    gaps = candidate_gaps(cells)
    lines = ["## Every rule out of sample, per model family", "",
             "Mean / max gap to the grid best over the cells of each family (LDS read off each "
             "cell's grid by interpolation in log lambda, the same for every rule). A rule with "
             "a constant is *left one setting out*: the constant best on every other setting is "
             "applied to the setting left out. Per-block rules exist only on cells with one "
             "block per layer (LoGra per layer, K-FAC, EK-FAC); `–`: the rule does not apply to "
             "any cell of the family (older cells stored no spectrum statistics).", "",
             *_family_header("rule", fams)]
    for name, g in gaps.items():
        cols = [_mean_max(g[by_family == f]) for f in fams]
        lines.append(f"| {name} | {int(np.isfinite(g).sum())} | {_mean_max(g)} | "
                     + " | ".join(cols) + " |")
    lines += _calibration_lines(cells, by_family, fams)
    lines += _seed_lines(cells, gaps)
    lines += _diagnosis_lines(cells)
    lines += _reliability_lines(cells, gaps)
    return lines


def _family_header(first: str, fams: list[str]) -> list[str]:
    """The two header lines of a table with one column per model family."""
    return [f"| {first} | cells | all | " + " | ".join(fams) + " |",
            "|---|---|---|" + "---|" * len(fams)]


def _calibration_lines(cells: list[Cell], by_family: np.ndarray, fams: list[str]) -> list[str]:
    with_cal = [i for i, c in enumerate(cells) if c.get("calibration")]
    if not with_cal:
        return []
    ks = sorted({int(k) for i in with_cal for k in cells[i]["calibration"]})
    lines = ["", "## Few retrained models (`--calibrate K`)", "",
             "K of the ground truth's subsets drawn at random (100 draws per cell): lambda = the "
             "grid point with the highest LDS on those K (`argmax`), on its three-point "
             "moving average along the grid (`smoothed`, what `--calibrate` does), or on that "
             "average among the lambdas where the validation mean xi lies between 0.3 and 0.8 "
             "(`windowed`); its gap is measured on the other subsets. `xi`: the "
             "retraining-free selection (nearest grid point) measured on the same unseen "
             "subsets, for a paired comparison (a gap on M - K subsets is noisy itself). "
             "Per family: mean over cells of the median draw / worst draw over all cells.", "",
             *_family_header("K, selection", fams)]
    for variant, k in [(v, k) for v in ("argmax", "smoothed", "windowed", "xi") for k in ks]:
        med = np.full(len(cells), math.nan)
        worst = np.full(len(cells), math.nan)
        for i in with_cal:
            draws = cells[i]["calibration"].get(str(k))
            if isinstance(draws, dict):  # raw and smoothed selections: the product's is smoothed
                draws = draws.get(variant)
            elif variant != "argmax":
                draws = None
            if draws:
                med[i], worst[i] = float(np.median(draws)), float(np.max(draws))

        def col(mask: np.ndarray, med: np.ndarray = med, worst: np.ndarray = worst) -> str:
            m, w = med[mask], worst[mask]
            ok = np.isfinite(m)
            return "–" if not ok.any() else f"{m[ok].mean():.3f} / {w[ok].max():.3f}"
        lines.append(f"| {k}, {variant} | {int(np.isfinite(med).sum())} | "
                     f"{col(np.ones(len(cells), bool))} | "
                     + " | ".join(col(by_family == f) for f in fams) + " |")
    return lines


def _seed_lines(cells: list[Cell], gaps: dict[str, np.ndarray]) -> list[str]:
    seeds = sorted({seed_of(c) for c in cells})
    if len(seeds) < 2:
        return []
    names = ["xi >= 0.5", "q = 0.9", "0.01 x top", "c x top eigenvalue, left one setting out"]
    lines = ["", "## Spread over independently trained models", "",
             f"Mean gap per training seed ({', '.join(map(str, seeds))}), per setting: "
             "min – max over seeds.", "",
             "| setting | method | seeds | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    keys = sorted({(setting_key(c), c["method"]) for c in cells})
    for setting, method in keys:
        idx = [i for i, c in enumerate(cells) if (setting_key(c), c["method"]) == (setting, method)]
        have = sorted({seed_of(cells[i]) for i in idx})
        if len(have) < 2:
            continue
        cols = []
        for name in names:
            per_seed = [np.nanmean([gaps[name][i] for i in idx if seed_of(cells[i]) == s])
                        for s in have]
            cols.append(f"{min(per_seed):.3f} – {max(per_seed):.3f}")
        lines.append(f"| {setting} | {method} | {len(have)} | " + " | ".join(cols) + " |")
    return lines


def _diagnosis_lines(cells: list[Cell]) -> list[str]:
    diag = [c for c in cells if "curves" in c.get("condition", {})]
    if not diag:
        return []
    parts_of = {id(c): decompose(stored_curves(c), xi_rule(0.5)(c) or math.nan) for c in diag}
    lines = ["", "## Where the selection's error comes from", "",
             "Per setting, medians over its cells (log10 decades; positive: the selection lies "
             "above). `condition`: selected lambda against the zero of the exact condition (*) "
             "(the constant threshold and the Cauchy-Schwarz slack together); `collapse`: the "
             "zero of (*) against the population-Pearson optimum (the variance collapse "
             "sum_i g_i = 0 that (*) assumes); `sampling`: population against sample-Pearson "
             "optimum over the M subsets; `spearman`: Pearson against Spearman optimum. "
             "Oracle threshold: mean xi (explained examples) at the best lambda. corr_B "
             "measurable: fraction of explained examples whose split-half r^T B r is positive "
             "at the best lambda.", "",
             "| setting | cells | total | condition | collapse | sampling | spearman | oracle "
             "threshold (min – max) | corr_B measurable |", "|---|---|---|---|---|---|---|---|---|"]
    for setting in sorted({setting_key(c) for c in diag}):
        group = [c for c in diag if setting_key(c) == setting]
        parts = {k: np.median([parts_of[id(c)][k] for c in group])
                 for k in ("total", "condition", "collapse", "sampling", "spearman")}
        oracle = [parts_of[id(c)]["oracle_threshold"] for c in group]
        measurable = []
        for c in group:
            cur = c["condition"]["curves"]
            i = int(np.nanargmax(cur["spearman"]))
            measurable.append(cur["corr_b_defined"][i])
        lines.append(f"| {setting} | {len(group)} | {parts['total']:+.2f} | "
                     f"{parts['condition']:+.2f} | {parts['collapse']:+.2f} | "
                     f"{parts['sampling']:+.2f} | {parts['spearman']:+.2f} | "
                     f"{np.median(oracle):.2f} ({min(oracle):.2f} – "
                     f"{max(oracle):.2f}) | {np.mean(measurable):.2f} |")
    return lines


def stored_curves(cell: Cell) -> ConditionCurves:
    """The condition curves a cell stored."""
    cur = cell["condition"]["curves"]
    return ConditionCurves(**{f.name: np.asarray(cur.get(f.name, np.full(len(cur["lambdas"]),
                                                                       np.nan)), dtype=np.float64)
                              for f in fields(ConditionCurves)})


def _reliability_lines(cells: list[Cell], gaps: dict[str, np.ndarray]) -> list[str]:
    signals = [reliability_signals(c) for c in cells]
    judged = {"q = 0.9 (the default)": gaps["q = 0.9"], "xi >= 0.5": gaps["xi >= 0.5"]}
    lines = ["", "## Does the reliability diagnostic predict the gap?", "",
             "Spearman rank correlation over cells between each retraining-free signal (of xi's "
             "selection at 0.5; distance: decades between it and the spectrum's 0.9 quantile) "
             "and the gap to the grid best of each rule.", "",
             "| signal | cells | " + " | ".join(f"with the gap of {k}" for k in judged) + " |",
             "|---|---|" + "---|" * len(judged)]
    for name in ("slope", "spread", "distance"):
        x = np.array([s.get(name, math.nan) for s in signals])
        cols = [rank_correlation(x, g) for g in judged.values()]
        lines.append(f"| {name} | {cols[0][1]} | " + " | ".join(_fmt(r) for r, _ in cols) + " |")
    distance = np.array([s.get("distance", math.nan) for s in signals])
    flagged = distance > DISTANCE_MAX
    for name, gap in judged.items():
        ok = np.isfinite(distance) & np.isfinite(gap)
        if ok.any():
            lines += ["", f"`unsure` (distance > {DISTANCE_MAX:g} decade), gap of {name}: "
                      f"{int((flagged & ok).sum())} of {int(ok.sum())} cells flagged, mean / max "
                      f"{_mean_max(gap[flagged & ok])}; the others {_mean_max(gap[~flagged & ok])}."]
    return lines
