"""What an eigen cell records beyond its LDS grid, so that selection rules can be compared
and diagnosed from stored cells without refitting anything.

- ``spectrum_stats``: eigenvalue quantiles (q = 0.05, 0.10, ..., 0.95) and the mean eigenvalue
  of the validation spectrum, so every fixed-quantile and every c x mean / c x top rule can be
  scored by interpolating the cell's LDS grid in log lambda.
- ``condition``: every link of the selection's derivation measured against the ground truth
  along the LDS grid (``tdatune.evaluate.condition``), and the selection's error split into
  decades.
- ``calibration``: the out-of-sample gaps of selecting with K retrained models, over many
  draws of K of the ground truth's subsets.
- ``xi_centered_curve``: the validation mean of xi_c (``tdatune.select.centered``) on the
  mean-xi curve's grid.
- ``blockwise``: for a path of several blocks (LoGra's layers), LDS with one damping per block,
  by Kronfluence's heuristic (0.1 x the block's mean eigenvalue) and by xi on each block's own
  coordinates.
- ``default_selection``: what the product itself would use (the attributor's default rule,
  :func:`tdatune.select.damping_choice.choose_damping`): rule, lambda or one per block by name,
  and its LDS, beside xi's selections.
- ``candidate_calibration``: choosing among a handful of candidate dampings (the default, xi's,
  two quantiles, per layer, almost none) with K retrained models by paired differences,
  judged out of sample over many draws (gaps to the grid best on the unseen subsets).
- ``flow``: LDS along the same grid with the gradient-flow filter (1 - exp(-sigma / lambda)) /
  sigma in place of the damped inverse (``tdatune.attributors.lambda_path.damped_inverse``), so
  a study can say whether the filter of the training's own dynamics beats the best damping.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch

from tdatune.attributors.base import Attributor
from tdatune.attributors.damping import PER_LAYER_FRACTION, Damping, block_mean_dampings
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.data.base import ArrayDataset
from tdatune.evaluate.calibrate import XI_WINDOW, calibration_draws, candidate_draws, window_mask
from tdatune.evaluate.condition import condition_curves, decompose, first_crossing
from tdatune.evaluate.groundtruth import GroundTruth
from tdatune.evaluate.lds import lds_at, lds_path
from tdatune.select.centered import centered_indicator
from tdatune.select.damping_choice import choose_damping
from tdatune.select.quantile import quantile_lambda
from tdatune.select.surrogate import ZERO_RTOL, Selection, select_lambda

STAT_QUANTILES = tuple(round(0.05 * i, 2) for i in range(1, 20))
CALIBRATION_K = (3, 5, 10)
CALIBRATION_DRAWS = 100


def spectrum_stats(sigma: torch.Tensor) -> dict[str, Any]:
    """Quantiles of the non-zero eigenvalues and their mean and maximum."""
    s = sigma.double()
    nonzero = s[s > ZERO_RTOL * float(s.max())]
    qs = torch.quantile(nonzero, torch.tensor(STAT_QUANTILES, dtype=torch.float64))
    return {"quantiles": {f"{q:g}": float(v) for q, v in zip(STAT_QUANTILES, qs, strict=True)},
            "mean": float(s.mean()), "mean_nonzero": float(nonzero.mean()), "top": float(s.max())}


def diagnose(test_path: LambdaPath, val_path: LambdaPath, gt: GroundTruth, grid: torch.Tensor,
             selections: list[Selection], xi_grid: torch.Tensor, xi_mean: torch.Tensor,
             threshold: float,
             blockwise: bool = False, default: Damping | None = None) -> dict[str, Any]:
    """The diagnosis blocks of one eigen cell (``condition`` is left out, with the reason under
    ``condition_error``, where the path is not a single Fisher eigenbasis; ``blockwise`` only
    when asked for and the path has several blocks)."""
    out: dict[str, Any] = {"spectrum_stats": spectrum_stats(val_path.sigma)}
    outputs = np.asarray(gt.mean_outputs, dtype=np.float64)
    sigma_val, c_val = val_path.sigma, val_path.explained_coords
    centered = centered_indicator(sigma_val, c_val, val_path.train_coords, xi_grid).numpy()
    with np.errstate(invalid="ignore"):
        out["xi_centered_curve"] = {"lambdas": xi_grid.tolist(),
                                    "xi_mean": np.nanmean(centered, axis=0).tolist()}
    if len(grid):
        chosen = next((s for s in selections if s.threshold == threshold), None)
        try:
            curves = condition_curves(test_path, gt.masks, outputs, grid)
        except ValueError as err:
            out["condition_error"] = str(err)
        else:
            out["condition"] = {"curves": curves.to_dict(),
                                **({"decomposition": decompose(curves, chosen.lam)}
                                   if chosen is not None else {})}
        preds = test_path.subset_predictions(gt.masks, grid).numpy()
        total = preds.shape[2]
        window = window_mask(grid.numpy(), xi_window(xi_grid.numpy(), xi_mean.numpy()))
        fixed = {}
        if chosen is not None:  # the retraining-free selection, judged on the same subsets
            fixed["xi"] = int(np.argmin(np.abs(np.log(grid.numpy()) - math.log(chosen.lam))))
        out["calibration"] = {str(k): calibration_draws(preds, outputs, k, CALIBRATION_DRAWS,
                                                        seed=k, window=window, fixed=fixed)
                              for k in CALIBRATION_K if k <= total - 3}
        if default is not None:
            cands = candidate_dampings(val_path, default, chosen)
            cpreds = np.stack([test_path.blockwise_predictions(gt.masks, lam).numpy()
                               for lam in cands.values()])
            out["candidate_calibration"] = {
                "candidates": cands, "default": "default",
                "draws": {str(k): candidate_draws(cpreds, outputs, k, list(cands), "default",
                                                  grid_preds=preds, draws=CALIBRATION_DRAWS,
                                                  seed=k)
                          for k in CALIBRATION_K if k <= total - 3}}
        try:
            out["flow"] = flow_lds(test_path, gt, grid)
        except ValueError as err:  # a signed spectrum: no flow filter
            out["flow_error"] = str(err)
    if blockwise and len(test_path.block_sizes()) > 1:
        try:
            out["blockwise"] = _blockwise(test_path, val_path, gt, threshold)
        except ValueError as err:  # the other blocks of the diagnosis stand without it
            out["blockwise_error"] = str(err)
    return out


def candidate_dampings(val_path: LambdaPath, default: Damping, chosen: Selection | None
                       ) -> dict[str, Damping]:
    """The handful a few retrained models choose among: the default damping, xi's lambda, the
    0.9 and 0.5 spectrum quantiles, per layer 0.1 x mean (several blocks) and almost no damping
    (1e-6 x top); each only once."""
    sigma, _ = val_path.spectrum()
    top = float(sigma.max())
    cands: dict[str, Damping] = {"default": default}
    if chosen is not None:  # Algorithm 1's lambda (kept beside the lambda of another rule)
        cands["xi"] = float(chosen.lam if chosen.xi_lambda is None else chosen.xi_lambda)
    cands |= {"q0.9": quantile_lambda(sigma, 0.9), "q0.5": quantile_lambda(sigma, 0.5),
              "tiny": 1e-6 * top}
    if len(val_path.block_sizes()) > 1:
        cands["per_layer"] = block_mean_dampings(sigma, val_path.block_sizes(), PER_LAYER_FRACTION)
    out: dict[str, Damping] = {}
    for name, lam in cands.items():
        if not any(_same_damping(lam, kept) for kept in out.values()):
            out[name] = lam
    return out


def _same_damping(a: Damping, b: Damping) -> bool:
    if isinstance(a, list) != isinstance(b, list):
        return False
    return bool(np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=1e-9))


def default_selection(att: Attributor, test_path: LambdaPath, val: ArrayDataset, gt: GroundTruth,
                      threshold: float) -> dict[str, Any]:
    """The attributor's default damping on ``val`` and its LDS on the test path."""
    choice = choose_damping(att, val, threshold=threshold)
    result = lds_at(test_path, gt.masks, gt.mean_outputs, choice.lam, invalid="mask")
    return {**choice.to_dict(), "lds": result.mean, "sem": result.sem}


def flow_lds(test_path: LambdaPath, gt: GroundTruth, grid: torch.Tensor) -> dict[str, Any]:
    """Mean LDS over the explained examples at each grid lambda under the flow filter."""
    results = lds_path(test_path, gt.masks, gt.mean_outputs, grid, invalid="mask", filter="flow")
    return {"lambdas": [float(x) for x in grid], "lds": [r.mean for r in results]}


def xi_window(lambdas: np.ndarray, xi_mean: np.ndarray) -> tuple[float, float]:
    """The lambdas where mean xi first reaches the two levels of ``XI_WINDOW``."""
    lo, hi = (first_crossing(lambdas, xi_mean, t) for t in XI_WINDOW)
    return (float(lambdas[0]) if math.isnan(lo) else lo,
            float(lambdas[-1]) if math.isnan(hi) else hi)


def _blockwise(test_path: LambdaPath, val_path: LambdaPath, gt: GroundTruth,
               threshold: float) -> dict[str, Any]:
    """LDS with one damping per block: Kronfluence's heuristic and xi per block."""
    edges = np.cumsum([0, *val_path.block_sizes()])
    heuristic = block_mean_dampings(val_path.sigma, val_path.block_sizes(), PER_LAYER_FRACTION)
    by_xi = []
    for lo, hi in itertools.pairwise(edges):
        sigma = val_path.sigma[lo:hi]
        by_xi.append(select_lambda(sigma, val_path.explained_coords[:, lo:hi],
                                   threshold=threshold).lam)
    projected = test_path.project_masks(gt.masks)
    result: dict[str, Any] = {"blocks": len(heuristic)}
    for name, lams in (("heuristic", heuristic), ("xi", by_xi)):
        at = lds_at(test_path, gt.masks, gt.mean_outputs, lams, invalid="mask", projected=projected)
        result[name] = {"lambdas": lams, "lds": at.mean}
    return result
