"""Linear Datamodeling Score: per explained example, the Spearman correlation over subsets
between predicted subset sums and the retrained models' outputs.

Numbers that cannot be trusted are not averaged silently: ground-truth outputs with NaN or
inf, or that are the same for every subset (constant: Spearman undefined), and non-finite
scores raise an error naming the explained example; with ``invalid="mask"`` those examples
are left out instead and counted in :attr:`LDSResult.n_masked`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tdatune.attributors.damping import Damping
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.utils.checks import check_choice, check_shape
from tdatune.utils.correlation import spearman_rows

INVALID_POLICIES = ("raise", "mask")


@dataclass
class LDSResult:
    """Per-example LDS with its mean and standard error (NaN rows excluded)."""

    per_example: np.ndarray
    mean: float
    sem: float
    n_valid: int
    n_masked: int = 0  # explained examples left out for invalid ground truth (invalid="mask")

    def to_dict(self) -> dict[str, float]:
        """JSON-friendly summary."""
        return {"lds": self.mean, "sem": self.sem, "n_valid": self.n_valid,
                "n_masked": self.n_masked}


def summarize(per_example: np.ndarray, n_masked: int = 0) -> LDSResult:
    """Mean and standard error over the finite entries."""
    valid = per_example[np.isfinite(per_example)]
    n = int(valid.size)
    mean = float(valid.mean()) if n else float("nan")
    sem = float(valid.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return LDSResult(per_example=per_example, mean=mean, sem=sem, n_valid=n, n_masked=n_masked)


def invalid_outputs(outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks [m] of explained examples whose ground-truth outputs [M, m] hold NaN/inf, and of
    those that are constant over the subsets (finite but all equal)."""
    nonfinite = ~np.isfinite(outputs).all(axis=0)
    with np.errstate(invalid="ignore"):
        constant = ~nonfinite & (np.ptp(np.where(np.isfinite(outputs), outputs, 0), axis=0) == 0)
    return nonfinite, constant


def _screen(outputs: np.ndarray, invalid: str) -> np.ndarray:
    """The explained examples to keep (all, or raise) under the ``invalid`` policy."""
    check_choice("invalid-output policy", invalid, INVALID_POLICIES)
    nonfinite, constant = invalid_outputs(outputs)
    bad = nonfinite | constant
    if invalid == "raise" and bool(bad.any()):
        if bool(nonfinite.any()):
            j = int(np.nonzero(nonfinite)[0][0])
            subset = int(np.nonzero(~np.isfinite(outputs[:, j]))[0][0])
            what = (f"NaN or inf for explained example {j} (first in subset {subset}; "
                    f"{int(nonfinite.sum())} example(s) in all)")
        else:
            j = int(np.nonzero(constant)[0][0])
            what = (f"the same value {outputs[0, j]!r} in every subset for explained example {j} "
                    f"({int(constant.sum())} example(s) in all), so its rank correlation is "
                    "undefined")
        raise ValueError(
            f"ground-truth outputs hold {what}; rebuild the ground truth (a diverged or "
            "saturated retraining: lower the learning rate, or use the margin output), or "
            "pass invalid='mask' to leave such examples out and count them"
        )
    return ~bad


def _check_finite_scores(name: str, values: np.ndarray) -> None:
    """Refuse non-finite predictions, naming the explained example (axis -2)."""
    finite = np.isfinite(values)
    if not bool(finite.all()):
        j = int(np.nonzero(~finite.all(axis=-1).reshape(-1, values.shape[-2]).any(axis=0))[0][0])
        raise ValueError(f"{name} hold NaN or inf for explained example {j}; the attributor "
                         "diverged for it (try a larger damping lambda)")


def subset_sums(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Predicted subset outputs sum_{i in S_m} tau(z'_j, z_i): [m, M]."""
    check_shape("subset masks", masks, [None, scores.shape[1]])
    return scores.double() @ masks.double().T


def lds(scores: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor | np.ndarray, *,
        invalid: str = "raise") -> LDSResult:
    """LDS of a score matrix [m, n] against ground truth: masks [M, n], outputs [M, m].

    Ground-truth outputs with NaN/inf or constant over the subsets raise (``invalid="raise"``)
    or leave their explained examples out, counted in ``n_masked`` (``invalid="mask"``, their
    ``per_example`` entries are NaN); non-finite scores always raise.
    """
    outputs = torch.as_tensor(np.asarray(outputs), dtype=torch.float64)
    check_shape("ground-truth outputs", outputs, [masks.shape[0], scores.shape[0]])
    keep = _screen(outputs.numpy(), invalid)
    preds = subset_sums(scores, masks).numpy()
    _check_finite_scores("predicted subset outputs (scores summed over each subset)", preds)
    rho = spearman_rows(preds, outputs.T.numpy())
    return summarize(np.where(keep, rho, np.nan), n_masked=int((~keep).sum()))


def lds_path(path: LambdaPath, masks: torch.Tensor, outputs: torch.Tensor | np.ndarray,
             lambdas: torch.Tensor | list[float], *, invalid: str = "raise",
             filter: str = "damping") -> list[LDSResult]:
    """LDS at every lambda of a lambda-path, without forming score matrices (``invalid`` as
    in :func:`lds`; ``filter``: the path's spectral filter, damping or gradient flow).

    ``masks`` [M, n] are the retrained subsets, ``outputs`` [M, m] their (seed-averaged)
    outputs on the explained examples (a ground truth's ``masks`` and ``mean_outputs``).
    Returns a list of one LDSResult per lambda, in the order of ``lambdas``: each holds
    ``mean`` (the LDS), ``sem``, ``per_example`` [m], ``n_valid`` and ``n_masked``, as
    :func:`lds` returns for the scores at that lambda. The best lambda of the grid is
    ``lambdas[int(np.nanargmax([r.mean for r in results]))]``."""
    preds = path.subset_predictions(masks, lambdas, filter=filter).numpy()  # [L, m, M]
    return _predicted_lds(preds, masks, outputs, invalid)


def lds_at(path: LambdaPath, masks: torch.Tensor, outputs: torch.Tensor | np.ndarray,
           damping: Damping, *, invalid: str = "raise",
           projected: torch.Tensor | None = None) -> LDSResult:
    """LDS of a lambda-path at one damping, which may be one value per block (any form
    ``LambdaPath.entry_lambdas`` takes: a list, ``{block: value}``, ``"per_layer"``), without
    forming the score matrix (arguments as in :func:`lds_path`; ``projected``: the masks
    already projected, ``path.project_masks(masks)``, to reuse across dampings)."""
    preds = path.blockwise_predictions(masks, damping, projected).numpy()[None]  # [1, m, M]
    return _predicted_lds(preds, masks, outputs, invalid)[0]


def _predicted_lds(preds: np.ndarray, masks: torch.Tensor, outputs: torch.Tensor | np.ndarray,
                   invalid: str) -> list[LDSResult]:
    """LDS of predicted subset sums ``preds`` [L, m, M] against ``outputs`` [M, m]."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.shape != (masks.shape[0], preds.shape[1]):
        raise ValueError(f"ground-truth outputs must have shape [{masks.shape[0]}, {preds.shape[1]}], "
                         f"got {list(outputs.shape)}")
    keep = _screen(outputs, invalid)
    _check_finite_scores("lambda-path subset predictions", preds)
    rho = spearman_rows(preds, outputs.T[None])  # [L, m]
    return [summarize(np.where(keep, r, np.nan), n_masked=int((~keep).sum())) for r in rho]
