"""The spectrum-quantile baseline: lambda = the q-quantile of the non-zero eigenvalues."""

from __future__ import annotations

import math

import torch

from tdatune.attributors.lambda_path import NULL_RTOL
from tdatune.utils.checks import check_open_unit

ZERO_RTOL = NULL_RTOL  # eigenvalues below this fraction of the largest count as zero (null space)


def quantile_lambda(sigma: torch.Tensor, q: float, rank: int | None = None) -> float:
    """The q-quantile (0 < q < 1) of the eigenvalues above ``ZERO_RTOL`` x the largest.

    ``rank``: the number of non-zero eigenvalues of the whole spectrum when ``sigma`` holds
    only its top ones (a truncated eigensystem, IFFIM's ``eig_rank``). The quantile is then
    read at its place in the whole spectrum, (1 - q)(rank - 1) from the top, interpolated as
    ``torch.quantile`` does: exact when the eigenvalues held reach that far, else the
    smallest one held (an upper bound)."""
    check_open_unit("quantile q", q)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    top = float(sigma.max()) if sigma.numel() else 0.0
    if not top > 0:
        raise ValueError("the spectrum has no positive eigenvalue")
    nonzero = sigma[sigma > ZERO_RTOL * top]
    if rank is None or rank <= nonzero.numel():
        return float(torch.quantile(nonzero, q))
    desc = nonzero.sort(descending=True).values
    t = (1 - q) * (rank - 1)
    lo = math.floor(t)
    if lo + 1 >= desc.numel():
        return float(desc[-1])
    return float(desc[lo] + (desc[lo + 1] - desc[lo]) * (t - lo))
