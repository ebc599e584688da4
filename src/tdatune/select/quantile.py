"""The spectrum-quantile baseline: lambda = the q-quantile of the non-zero eigenvalues."""

from __future__ import annotations

import torch

from tdatune.attributors.lambda_path import NULL_RTOL
from tdatune.utils.checks import check_open_unit

ZERO_RTOL = NULL_RTOL  # eigenvalues below this fraction of the largest count as zero (null space)


def quantile_lambda(sigma: torch.Tensor, q: float) -> float:
    """The q-quantile (0 < q < 1) of the eigenvalues above ``ZERO_RTOL`` x the largest."""
    check_open_unit("quantile q", q)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    top = float(sigma.max()) if sigma.numel() else 0.0
    if not top > 0:
        raise ValueError("the spectrum has no positive eigenvalue")
    nonzero = sigma[sigma > ZERO_RTOL * top]
    return float(torch.quantile(nonzero, q))
