"""How far to trust a selection, without retraining.

Three signals, each computed from what the selection already has (the validation xi curves and
the spectrum):

- ``slope``: the rise of mean xi per decade of lambda at the crossing. A shallow curve means a
  small change of the threshold (or of the model) moves the selection far.
- ``spread``: the interquartile range, in decades, of the lambdas at which the validation
  examples' own xi curves cross the threshold. Examples that disagree by decades share one
  lambda badly.
- ``distance``: |log10(selected / (0.01 x top eigenvalue))|, the disagreement with the simplest
  spectrum rule; when two unrelated rules agree, the selection is less likely to be far off.

How well each signal predicts the LDS gap over the study's cells is measured by ``tdatune
rules`` and reported in ``docs/study.md``: over 100+ cells of 8 settings only ``distance`` has
a positive rank correlation with the gap (about 0.3), so ``unsure`` is raised by the distance
alone (``DISTANCE_MAX``); slope and spread are reported, with their reasons, as information.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SLOPE_MIN = 0.25     # mean xi per decade at the crossing
SPREAD_MAX = 1.5     # decades between the quartiles of the per-example crossings
DISTANCE_MAX = 1.0   # decades from 0.01 x the top eigenvalue
TOP_FRACTION = 0.01  # the spectrum rule the distance is measured to


@dataclass
class Reliability:
    """Retraining-free signals of how far a selection may be from the best lambda."""

    slope: float
    spread: float
    distance: float

    @property
    def unsure(self) -> bool:
        """Whether the two unrelated rules disagree by more than ``DISTANCE_MAX`` decades (the
        one signal that predicts large gaps over the study's cells)."""
        return self.distance > DISTANCE_MAX

    def reasons(self) -> list[str]:
        """Plain-language notes on every signal past its limit (empty when none)."""
        out = []
        if not self.slope >= SLOPE_MIN:
            out.append(f"mean xi rises only {self.slope:.2f} per decade at the crossing "
                       f"(< {SLOPE_MIN}): a small change moves the selection far")
        if self.spread > SPREAD_MAX:
            out.append(f"the validation examples' own crossings spread over {self.spread:.1f} "
                       f"decades (> {SPREAD_MAX})")
        if self.distance > DISTANCE_MAX:
            out.append(f"{self.distance:.1f} decades from {TOP_FRACTION:g} x the top eigenvalue "
                       f"(> {DISTANCE_MAX})")
        return out

    def line(self) -> str:
        """The three signals and the verdict in one line."""
        return (f"xi slope {self.slope:.2f}/decade, crossings spread {self.spread:.1f} dec, "
                f"{self.distance:.1f} dec from {TOP_FRACTION:g} x top: "
                + ("UNSURE" if self.unsure else "consistent"))

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly summary."""
        return {"slope": self.slope, "spread": self.spread, "distance": self.distance,
                "unsure": self.unsure, "reasons": self.reasons(), "line": self.line()}


def crossing_slope(lambdas: np.ndarray, xi_mean: np.ndarray, threshold: float) -> float:
    """d(mean xi) / d(log10 lambda) over the grid interval where the curve first reaches
    ``threshold`` (0 when it never does, the first interval's slope when it starts above)."""
    lam = np.log10(np.asarray(lambdas, dtype=np.float64))
    xi = np.asarray(xi_mean, dtype=np.float64)
    above = np.nonzero(xi >= threshold)[0]
    if above.size == 0:
        return 0.0
    i = max(int(above[0]), 1)
    return float((xi[i] - xi[i - 1]) / (lam[i] - lam[i - 1]))


def crossing_spread(lambdas: np.ndarray, xi: np.ndarray, threshold: float) -> float:
    """Interquartile range in decades of the per-example first crossings (rows of ``xi`` [m, L]
    on ``lambdas``; an example that never crosses counts at the grid's last lambda)."""
    lam = np.log10(np.asarray(lambdas, dtype=np.float64))
    rows = np.asarray(xi, dtype=np.float64)
    rows = rows[~np.isnan(rows).any(axis=1)]
    if rows.shape[0] == 0:
        return math.nan
    first = np.where((rows >= threshold).any(axis=1), (rows >= threshold).argmax(axis=1),
                     len(lam) - 1)
    q1, q3 = np.percentile(lam[first], [25, 75])
    return float(q3 - q1)


def reliability(lambdas: np.ndarray, xi: np.ndarray, threshold: float, selected: float,
                top_eigenvalue: float) -> Reliability:
    """The three signals for a selection from the per-example xi curves ``xi`` [m, L]."""
    rows = np.asarray(xi, dtype=np.float64)
    mean = np.nanmean(rows, axis=0)
    return Reliability(slope=crossing_slope(lambdas, mean, threshold),
                       spread=crossing_spread(lambdas, rows, threshold),
                       distance=abs(math.log10(selected / (TOP_FRACTION * top_eigenvalue))))
