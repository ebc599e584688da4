"""Row-wise Pearson and Spearman correlations (the LDS's and every agreement's measure)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata


def spearman_rows(pred: np.ndarray | torch.Tensor, actual: np.ndarray | torch.Tensor) -> np.ndarray:
    """Spearman correlation of each row of ``pred`` with the same row of ``actual`` (ties get
    average ranks); NaN for a row where either side is constant. Leading axes broadcast."""
    return pearson_rows(rankdata(np.asarray(pred, dtype=np.float64), axis=-1),
                        rankdata(np.asarray(actual, dtype=np.float64), axis=-1))


def pearson_rows(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``pred`` with the same row of ``actual``; NaN for a
    row where either side is constant. Leading axes broadcast."""
    p = np.asarray(pred, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    p = p - p.mean(axis=-1, keepdims=True)
    a = a - a.mean(axis=-1, keepdims=True)
    num = (p * a).sum(axis=-1)
    den = np.sqrt((p * p).sum(axis=-1) * (a * a).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


__all__ = ["pearson_rows", "spearman_rows"]
