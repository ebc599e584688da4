"""How far to trust a selection, without retraining.

Three signals, each computed from what the selection already has (the validation xi curves and
the spectrum):

- ``slope``: the rise of mean xi per decade of lambda at the crossing. A shallow curve means a
  small change of the threshold (or of the model) moves the selection far.
- ``spread``: the interquartile range, in decades, of the lambdas at which the validation
  examples' own xi curves cross the threshold. Examples that disagree by decades share one
  lambda badly.
- ``distance``: |log10(xi's lambda / the spectrum's 0.9 quantile)|, the disagreement of the
  two unrelated rules (the default rule and Algorithm 1); when they agree, either is less
  likely to be far off.

How well each signal predicts the LDS gap over the study's cells is measured by ``tdatune
rules`` and reported in ``docs/study.md``: over 129 cells of 8 settings ``distance`` predicts
the gap of both rules (rank correlation 0.21 with the 0.9 quantile's, 0.33 with xi's; the cells
more than a decade apart have 2.6 and 4.3 times the mean gap and hold the worst ones), the
slope only the quantile's (0.47) and the spread neither, so ``unsure`` is raised by the
distance alone (``DISTANCE_MAX``); slope and spread are reported as notes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SLOPE_MIN = 0.25     # mean xi per decade at the crossing
SPREAD_MAX = 1.5     # decades between the quartiles of the per-example crossings
DISTANCE_MAX = 1.0   # decades between xi's lambda and the spectrum's 0.9 quantile
REFERENCE_QUANTILE = 0.9  # the spectrum rule the distance is measured to


@dataclass
class Reliability:
    """Retraining-free signals of how far a selection may be from the best lambda."""

    slope: float
    spread: float
    distance: float

    @property
    def unsure(self) -> bool:
        """Whether the two unrelated rules disagree by more than ``DISTANCE_MAX`` decades (the
        one signal that predicted large gaps over the study's cells)."""
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
            out.append(f"xi's lambda and the spectrum's {REFERENCE_QUANTILE:g} quantile are "
                       f"{self.distance:.1f} decades apart (> {DISTANCE_MAX:g})")
        return out

    def line(self) -> str:
        """The three signals and the verdict in one line."""
        return (f"xi slope {self.slope:.2f}/decade, crossings spread {self.spread:.1f} dec, "
                f"xi and q={REFERENCE_QUANTILE:g} {self.distance:.1f} dec apart: "
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
                reference: float) -> Reliability:
    """The three signals for Algorithm 1's ``selected`` lambda from the per-example xi curves
    ``xi`` [m, L], with ``reference`` the other rule's lambda (the spectrum's 0.9 quantile)."""
    rows = np.asarray(xi, dtype=np.float64)
    mean = np.nanmean(rows, axis=0)
    return Reliability(slope=crossing_slope(lambdas, mean, threshold),
                       spread=crossing_spread(lambdas, rows, threshold),
                       distance=abs(math.log10(selected / reference)))
