"""Few-retrain selection: choose lambda with K <= 10 retrained models.

With K subsets retrained, the LDS along a lambda grid can be measured directly on those K
subsets (a Spearman correlation over K points per explained example, averaged over the
explained examples); the selection is the grid lambda where it peaks. Its quality is judged on
subsets it did not see: :func:`calibration_draws` draws K of a ground truth's M subsets many
times, selects on them and measures the gap to the best grid lambda on the other M - K.
"""

from __future__ import annotations

import numpy as np
import torch

from tdatune.attributors.lambda_path import LambdaPath
from tdatune.evaluate.lds import spearman_rows

MAX_CALIBRATION_MODELS = 10


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


def pick(curve: np.ndarray, smoothed: bool = True) -> int:
    """The grid index a calibration selects from its LDS curve."""
    return int(np.nanargmax(smooth(curve) if smoothed else curve))


def calibrate_lambda(path: LambdaPath, masks: torch.Tensor, outputs: np.ndarray,
                     lambdas: torch.Tensor | list[float], smoothed: bool = True
                     ) -> tuple[float, np.ndarray]:
    """The grid lambda with the highest LDS (``smoothed``: after :func:`smooth`) on the given
    retrained subsets (masks [K, n], mean outputs [K, m], 3 <= K), and the raw LDS curve."""
    k = int(masks.shape[0])
    if k < 3:
        raise ValueError(f"calibration needs at least 3 retrained models (got {k}): a rank "
                         "correlation over fewer subsets is undefined or meaningless")
    lam = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
    preds = path.subset_predictions(masks, lam).numpy()
    curve = _lds_curve(preds, np.asarray(outputs, dtype=np.float64), np.arange(k))
    return float(lam[pick(curve, smoothed)]), curve


def calibration_draws(preds: np.ndarray, outputs: np.ndarray, k: int, draws: int = 200,
                      seed: int = 0) -> dict[str, list[float]]:
    """Out-of-sample gaps of :func:`calibrate_lambda` with ``k`` models, raw (``argmax``) and
    ``smoothed``: for each draw, select on ``k`` random subsets of the M and return (best LDS
    on the other M - k) minus (their LDS at the selected lambda). ``preds`` [L, m, M] are the
    subset predictions along the grid."""
    total = preds.shape[2]
    if not 3 <= k <= total - 3:
        raise ValueError(f"k must be between 3 and M - 3 = {total - 3} (got {k})")
    outputs = np.asarray(outputs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    gaps: dict[str, list[float]] = {"argmax": [], "smoothed": []}
    for _ in range(draws):
        order = rng.permutation(total)
        seen = _lds_curve(preds, outputs, order[:k])
        rest = _lds_curve(preds, outputs, order[k:])
        for name, smoothed in (("argmax", False), ("smoothed", True)):
            gaps[name].append(float(np.nanmax(rest) - rest[pick(seen, smoothed)]))
    return gaps
