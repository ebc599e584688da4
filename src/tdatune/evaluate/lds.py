"""Linear Datamodeling Score: per explained example, the Spearman correlation over subsets
between predicted subset sums and the retrained models' outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from tdatune.attributors.lambda_path import LambdaPath
from tdatune.utils.checks import check_shape


def spearman_rows(pred: np.ndarray | torch.Tensor, actual: np.ndarray | torch.Tensor) -> np.ndarray:
    """Spearman correlation of each row of ``pred`` with the same row of ``actual`` (ties get
    average ranks); NaN for a row where either side is constant. Leading axes broadcast."""
    p = rankdata(np.asarray(pred, dtype=np.float64), axis=-1)
    a = rankdata(np.asarray(actual, dtype=np.float64), axis=-1)
    p = p - p.mean(axis=-1, keepdims=True)
    a = a - a.mean(axis=-1, keepdims=True)
    num = (p * a).sum(axis=-1)
    den = np.sqrt((p * p).sum(axis=-1) * (a * a).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


@dataclass
class LDSResult:
    """Per-example LDS with its mean and standard error (NaN rows excluded)."""

    per_example: np.ndarray
    mean: float
    sem: float
    n_valid: int

    def to_dict(self) -> dict[str, float]:
        """JSON-friendly summary."""
        return {"lds": self.mean, "sem": self.sem, "n_valid": self.n_valid}


def summarize(per_example: np.ndarray) -> LDSResult:
    """Mean and standard error over the finite entries."""
    valid = per_example[np.isfinite(per_example)]
    n = int(valid.size)
    mean = float(valid.mean()) if n else float("nan")
    sem = float(valid.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return LDSResult(per_example=per_example, mean=mean, sem=sem, n_valid=n)


def subset_sums(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Predicted subset outputs sum_{i in S_m} tau(z'_j, z_i): [m, M]."""
    check_shape("subset masks", masks, [None, scores.shape[1]])
    return scores.double() @ masks.double().T


def lds(scores: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor | np.ndarray) -> LDSResult:
    """LDS of a score matrix [m, n] against ground truth: masks [M, n], outputs [M, m]."""
    outputs = torch.as_tensor(np.asarray(outputs), dtype=torch.float64)
    check_shape("ground-truth outputs", outputs, [masks.shape[0], scores.shape[0]])
    return summarize(spearman_rows(subset_sums(scores, masks).numpy(), outputs.T.numpy()))


def lds_path(path: LambdaPath, masks: torch.Tensor, outputs: torch.Tensor | np.ndarray,
             lambdas: torch.Tensor | list[float]) -> list[LDSResult]:
    """LDS at every lambda of a lambda-path, without forming score matrices."""
    outputs = np.asarray(outputs, dtype=np.float64)
    preds = path.subset_predictions(masks, lambdas).numpy()  # [L, m, M]
    if outputs.shape != (masks.shape[0], preds.shape[1]):
        raise ValueError(f"ground-truth outputs must have shape [{masks.shape[0]}, {preds.shape[1]}], "
                         f"got {list(outputs.shape)}")
    rho = spearman_rows(preds, outputs.T[None])  # [L, m]
    return [summarize(r) for r in rho]
