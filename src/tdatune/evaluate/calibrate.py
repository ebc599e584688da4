"""Few-retrain selection: choose lambda with K <= 10 retrained models.

With K subsets retrained, the LDS along a lambda grid can be measured directly on those K
subsets (a Spearman correlation over K points per explained example, averaged over the
explained examples); the selection is the grid lambda where it peaks. Its quality is judged on
subsets it did not see: :func:`calibration_draws` draws K of a ground truth's M subsets many
times, selects on them and measures the gap to the best grid lambda on the other M - K.

With so few models the whole grid is too many choices: :func:`calibrate_candidates` chooses
only among a handful of candidate dampings (the retraining-free rules' choices), by paired
per-example differences on the same K subsets, and keeps the attributor's default unless
another candidate is ahead by more than two standard errors (:func:`candidate_draws` judges
it out of sample the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tdatune.attributors.damping import Damping
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.evaluate.lds import spearman_rows

MAX_CALIBRATION_MODELS = 10
XI_WINDOW = (0.3, 0.8)  # mean-xi levels bounding the lambdas a windowed calibration considers


def _lds_curve(preds: np.ndarray, outputs: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Mean Spearman LDS per lambda over the subsets ``cols``: preds [L, m, M], outputs [M, m]."""
    rho = spearman_rows(preds[:, :, cols], outputs[cols].T[None])
    return np.nanmean(rho, axis=1)


def smooth(curve: np.ndarray) -> np.ndarray:
    """Three-point moving average along the grid (two points at the ends): the LDS measured on
    a few subsets is noisy per lambda, while the true curve is smooth in log lambda."""
    padded = np.concatenate([[np.nan], curve, [np.nan]])
    stacked = np.stack([padded[:-2], padded[1:-1], padded[2:]])
    with np.errstate(invalid="ignore"):
        return np.nanmean(stacked, axis=0)


def pick(curve: np.ndarray, smoothed: bool = True, allowed: np.ndarray | None = None) -> int:
    """The grid index a calibration selects from its LDS curve (among the ``allowed`` mask)."""
    values = smooth(curve) if smoothed else np.asarray(curve, dtype=np.float64)
    if allowed is not None and bool(allowed.any()):
        values = np.where(allowed, values, -np.inf)
    return int(np.nanargmax(values))


def window_mask(lambdas: np.ndarray, window: tuple[float, float] | None) -> np.ndarray | None:
    """The grid points inside ``window`` (lo, hi), widened to the grid points just outside it so
    that a narrow window still holds at least two; None for no window."""
    if window is None:
        return None
    lam = np.asarray(lambdas, dtype=np.float64)
    lo = max(int(np.searchsorted(lam, window[0], side="right")) - 1, 0)
    hi = min(int(np.searchsorted(lam, window[1], side="left")), len(lam) - 1)
    mask = np.zeros(len(lam), dtype=bool)
    mask[lo: hi + 1] = True
    return mask


def calibrate_lambda(path: LambdaPath, masks: torch.Tensor, outputs: np.ndarray,
                     lambdas: torch.Tensor | list[float], smoothed: bool = True,
                     window: tuple[float, float] | None = None) -> tuple[float, np.ndarray]:
    """The grid lambda with the highest LDS (``smoothed``: after :func:`smooth`) on the given
    retrained subsets (masks [K, n], mean outputs [K, m], 3 <= K), and the raw LDS curve.
    ``window`` (lo, hi) limits the search, e.g. to where mean xi lies between 0.3 and 0.8
    (:data:`XI_WINDOW`): a few models then choose the threshold, not any lambda (over the
    study's cells this did worse than the whole grid where xi is far off, e.g. on BERT)."""
    k = int(masks.shape[0])
    if k < 3:
        raise ValueError(f"calibration needs at least 3 retrained models (got {k}): a rank "
                         "correlation over fewer subsets is undefined or meaningless")
    lam = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
    preds = path.subset_predictions(masks, lam).numpy()
    curve = _lds_curve(preds, np.asarray(outputs, dtype=np.float64), np.arange(k))
    allowed = window_mask(lam.numpy(), window)
    return float(lam[pick(curve, smoothed, allowed)]), curve


def calibration_draws(preds: np.ndarray, outputs: np.ndarray, k: int, draws: int = 200,
                      seed: int = 0, window: np.ndarray | None = None,
                      fixed: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Out-of-sample gaps of :func:`calibrate_lambda` with ``k`` models, raw (``argmax``),
    ``smoothed`` and (given a ``window`` mask over the grid) ``windowed`` (smoothed, inside the
    window): for each draw, select on ``k`` random subsets of the M and return (best LDS on
    the other M - k) minus (their LDS at the selected lambda). ``preds`` [L, m, M] are the
    subset predictions along the grid. ``fixed`` (name: grid index) adds the gaps, on the same
    unseen subsets, of lambdas chosen without retraining: a paired comparison, since the gap
    measured on M - k subsets is itself noisy (their grid best is an optimistic maximum)."""
    total = preds.shape[2]
    if not 3 <= k <= total - 3:
        raise ValueError(f"k must be between 3 and M - 3 = {total - 3} (got {k})")
    outputs = np.asarray(outputs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    variants = [("argmax", False, None), ("smoothed", True, None)]
    if window is not None:
        variants.append(("windowed", True, window))
    gaps: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _ in range(draws):
        order = rng.permutation(total)
        seen = _lds_curve(preds, outputs, order[:k])
        rest = _lds_curve(preds, outputs, order[k:])
        for name, smoothed, allowed in variants:
            gaps[name].append(float(np.nanmax(rest) - rest[pick(seen, smoothed, allowed)]))
        for name, index in (fixed or {}).items():
            gaps.setdefault(name, []).append(float(np.nanmax(rest) - rest[index]))
    return gaps


PAIRED_Z = 2.0  # a candidate replaces the default only when ahead by this many standard errors
OTHER_Z = (0.0, 1.0)  # also judged by candidate_draws, so a study can say which z to use


@dataclass
class CandidateChoice:
    """What a few retrained models say among candidate dampings: the ``chosen`` name, each
    candidate's mean LDS on the K subsets, the paired advantage of the best over the default
    (``margin``, mean over explained examples of the per-example LDS difference, with its
    standard error ``sem``) and whether that settles it (``sure``)."""

    chosen: str
    default: str
    lds: dict[str, float]
    margin: float
    sem: float
    sure: bool

    def line(self) -> str:
        """One line for a person: which damping, and how sure."""
        best = max(self.lds, key=lambda name: self.lds[name])
        if self.chosen == self.default and best == self.default:
            return f"{self.default} is best on the retrained models ({self.lds[best]:.3f})"
        verdict = "settles it" if self.sure else "does not settle it: the default is kept"
        return (f"{best} leads {self.default} by {self.margin:+.3f} +/- {self.sem:.3f} LDS "
                f"(paired over explained examples); {verdict}")


def paired_choice(lds: np.ndarray, names: list[str], default: str,
                  z: float = PAIRED_Z) -> CandidateChoice:
    """Choose among candidates from per-example LDS ``lds`` [C, m] measured on the same
    retrained subsets: the candidate with the highest mean replaces ``default`` only when its
    paired per-example advantage exceeds ``z`` standard errors; otherwise the default stays
    (a few models must not overturn a rule on noise)."""
    lds = np.asarray(lds, dtype=np.float64)
    if lds.shape[0] != len(names) or default not in names:
        raise ValueError(f"{lds.shape[0]} LDS rows for candidates {names}; the default "
                         f"{default!r} must be one of them")
    with np.errstate(invalid="ignore"):
        means = np.nanmean(lds, axis=1)
    best = int(np.nanargmax(means))
    d = names.index(default)
    diff = lds[best] - lds[d]
    diff = diff[np.isfinite(diff)]
    margin = float(diff.mean()) if diff.size else 0.0
    sem = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("inf")
    sure = best != d and margin > z * sem
    return CandidateChoice(names[best] if sure else default, default,
                           {n: float(v) for n, v in zip(names, means, strict=True)},
                           margin, sem, bool(sure))


def calibrate_candidates(path: LambdaPath, masks: torch.Tensor, outputs: np.ndarray,
                         candidates: dict[str, Damping], default: str,
                         z: float = PAIRED_Z) -> CandidateChoice:
    """Choose among a handful of candidate dampings (each a lambda or one per block; e.g. the
    retraining-free rules' choices) with K >= 3 retrained subsets (masks [K, n], mean outputs
    [K, m]) by paired per-example differences (:func:`paired_choice`)."""
    k = int(masks.shape[0])
    if k < 3:
        raise ValueError(f"calibration needs at least 3 retrained models (got {k})")
    out = np.asarray(outputs, dtype=np.float64)
    names = list(candidates)
    rho = np.stack([spearman_rows(path.blockwise_predictions(masks, candidates[n]).numpy(), out.T)
                    for n in names])
    return paired_choice(rho, names, default, z)


def candidate_draws(preds: np.ndarray, outputs: np.ndarray, k: int, names: list[str],
                    default: str, grid_preds: np.ndarray | None = None, draws: int = 100,
                    seed: int = 0, z: float = PAIRED_Z) -> dict[str, list[float]]:
    """Out-of-sample gaps of :func:`paired_choice` with ``k`` models: per draw, choose on ``k``
    random subsets among the candidates (``preds`` [C, m, M]) and measure, on the other M - k,
    the best LDS (over the grid ``grid_preds`` [L, m, M] when given, else over the candidates)
    minus the chosen candidate's (``paired``; ``paired_z0``, ``paired_z1`` at the other
    ``OTHER_Z``), the same for the default kept (``default``), and for the best candidate on the
    unseen subsets (``candidates_best``: what no choice among them can beat)."""
    total = preds.shape[2]
    if not 3 <= k <= total - 3:
        raise ValueError(f"k must be between 3 and M - 3 = {total - 3} (got {k})")
    outputs = np.asarray(outputs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    gaps: dict[str, list[float]] = {"paired": [], "default": [], "sure": [],
                                    "candidates_best": []}
    gaps |= {f"paired_z{other:g}": [] for other in OTHER_Z}
    d = names.index(default)
    for _ in range(draws):
        order = rng.permutation(total)
        seen = spearman_rows(preds[:, :, order[:k]], outputs[order[:k]].T[None])
        choice = paired_choice(seen, names, default, z)
        rest = _lds_curve(preds, outputs, order[k:])
        top = float(np.nanmax(_lds_curve(grid_preds, outputs, order[k:]) if grid_preds is not None
                              else rest))
        gaps["paired"].append(top - float(rest[names.index(choice.chosen)]))
        gaps["default"].append(top - float(rest[d]))
        gaps["sure"].append(float(choice.sure))
        gaps["candidates_best"].append(top - float(np.nanmax(rest)))  # the best a choice could do
        for other in OTHER_Z:
            alt = paired_choice(seen, names, default, other).chosen
            gaps[f"paired_z{other:g}"].append(top - float(rest[names.index(alt)]))
    return gaps
