"""Few-retrain calibration and the reliability signals against computations written out here:
a dense solve per lambda with scipy's Spearman, and hand-worked curves."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from attr_problems import fisher_problem
from tdatune.evaluate.calibrate import calibrate_lambda, calibration_draws, smooth, window_mask
from tdatune.select.reliability import (
    crossing_slope,
    crossing_spread,
    reliability,
)


def test_calibration_picks_the_smoothed_best_lambda_of_a_dense_solve():
    g = torch.Generator().manual_seed(1)
    n, p, m, k = 30, 5, 4, 8
    G, V, F, path = fisher_problem(n, p, m, g, decades=3.0)
    masks = torch.rand(k, n, generator=g) < 0.5
    outputs = (masks.double() @ (-(G @ torch.linalg.solve(F + 1e-2 * torch.eye(p, dtype=torch.float64),
                                                          V.T)))
               + 0.2 * torch.randn(k, m, generator=g, dtype=torch.float64)).numpy()
    lams = np.logspace(-5, 1, 13)
    raw = []
    for lam in lams:
        scores = -(V @ torch.linalg.solve(F + lam * torch.eye(p, dtype=torch.float64), G.T))
        preds = (scores @ masks.double().T).numpy()  # [m, k]
        raw.append(np.mean([spearmanr(preds[j], outputs[:, j]).statistic for j in range(m)]))
    raw = np.array(raw)
    by_hand = [np.mean(raw[max(i - 1, 0): i + 2]) for i in range(len(raw))]
    lam, curve = calibrate_lambda(path, masks, outputs, lams)
    np.testing.assert_allclose(curve, raw, atol=1e-12)
    assert lam == pytest.approx(lams[int(np.argmax(by_hand))])
    lam_raw, _ = calibrate_lambda(path, masks, outputs, lams, smoothed=False)
    assert lam_raw == pytest.approx(lams[int(np.argmax(raw))])
    best = int(np.argmax(by_hand))
    lo, hi = (lams[0], lams[best - 2]) if best >= 3 else (lams[best + 2], lams[-1])
    inside = (lams >= lo) & (lams <= hi)  # a window that excludes the best grid point
    lam_w, _ = calibrate_lambda(path, masks, outputs, lams, window=(lo, hi))
    assert lam_w != pytest.approx(lams[best])
    assert lam_w == pytest.approx(lams[int(np.argmax(np.where(inside, by_hand, -np.inf)))])
    with pytest.raises(ValueError, match="at least 3"):
        calibrate_lambda(path, masks[:2], outputs[:2], lams)


def test_window_mask_by_hand():
    lam = np.array([1.0, 10.0, 100.0, 1000.0])
    assert window_mask(lam, (20.0, 50.0)).tolist() == [False, True, True, False]  # widened
    assert window_mask(lam, (10.0, 100.0)).tolist() == [False, True, True, False]
    assert window_mask(lam, (0.1, 1e4)).tolist() == [True] * 4
    assert window_mask(lam, None) is None


def test_smooth_by_hand():
    np.testing.assert_allclose(smooth(np.array([0.0, 3.0, 0.0, 6.0])), [1.5, 1.0, 3.0, 3.0])


def test_calibration_draws_are_exact_when_every_subset_agrees():
    """Predictions equal to the outputs at lambda indices 1-3 only: every draw of K subsets
    selects among them (smoothed: index 2, the only one whose neighbours are perfect too) and
    the gap on the others is 0; with random predictions the gap is >= 0."""
    rng = np.random.default_rng(0)
    L, m, M = 5, 3, 20
    outputs = rng.normal(size=(M, m))
    preds = rng.normal(size=(L, m, M))
    preds[1:4] = outputs.T
    window = np.array([False, True, True, True, False])
    draws = calibration_draws(preds, outputs, 5, draws=30, window=window,
                              fixed={"at 2": 2, "at 0": 0})
    assert set(draws) == {"argmax", "smoothed", "windowed", "at 2", "at 0"}
    for name in ("argmax", "smoothed", "windowed", "at 2"):
        assert len(draws[name]) == 30 and max(draws[name]) == pytest.approx(0.0), name
    assert min(draws["at 0"]) > 0  # random predictions are worse than perfect ones
    noisy = calibration_draws(rng.normal(size=(L, m, M)), outputs, 3, draws=30)
    assert min(noisy["argmax"]) >= 0 and max(noisy["argmax"]) > 0


def test_crossing_slope_and_spread_by_hand():
    lam = np.array([1e-3, 1e-2, 1e-1, 1.0])
    assert crossing_slope(lam, np.array([0.1, 0.2, 0.6, 0.9]), 0.5) == pytest.approx(0.4)
    assert crossing_slope(lam, np.array([0.6, 0.7, 0.8, 0.9]), 0.5) == pytest.approx(0.1)
    assert crossing_slope(lam, np.array([0.1, 0.2, 0.3, 0.4]), 0.5) == 0.0
    xi = np.array([[0.6, 0.7, 0.8, 0.9],     # crosses at 1e-3  (-3)
                   [0.1, 0.6, 0.8, 0.9],     # 1e-2 (-2)
                   [0.1, 0.2, 0.6, 0.9],     # 1e-1 (-1)
                   [0.1, 0.2, 0.3, 0.4]])    # never: counts at the last lambda (0)
    # quartiles of [-3, -2, -1, 0] (linear interpolation): -2.25 and -0.75
    assert crossing_spread(lam, xi, 0.5) == pytest.approx(1.5)


def test_reliability_flags_by_hand():
    lam = np.logspace(-4, 0, 5)
    steep = np.array([[0.0, 0.1, 0.9, 1.0, 1.0]] * 4)
    r = reliability(lam, steep, 0.5, selected=1e-2, reference=1e-2)
    assert r.distance == pytest.approx(0.0) and r.slope == pytest.approx(0.8)
    assert not r.unsure and r.reasons() == []
    far = reliability(lam, steep, 0.5, selected=1e-2, reference=10.0)
    assert far.distance == pytest.approx(3.0) and far.unsure
    assert any("decades apart" in x for x in far.reasons())
    flat = np.array([[0.45, 0.47, 0.49, 0.51, 0.53]] * 4)
    shallow = reliability(lam, flat, 0.5, 1e-2, 1e-2)
    assert not shallow.unsure  # a shallow curve alone did not predict large gaps
    assert any("per decade" in x for x in shallow.reasons())  # but it is reported
    assert math.isfinite(shallow.spread)
