"""Low-rank explained gradients: each explained example's (preconditioned) per-layer gradient
W [out, in] kept as left @ right ([out, r] and [r, in]), and its inner products with training
examples taken straight from the hooks' factors.

With the training gradient M_i = sum_t delta_it a_it^T of a Kronecker layer,

    <W, M_i> = sum_t delta_it^T W a_it = sum_t sum_r (delta_it . left[:, r]) (right[r, :] . a_it),

T r (in + out) multiply-adds per pair of examples instead of forming M_i (T in out) and
taking an in x out dot product. This is Kronfluence's ``query_gradient_low_rank``; the rank is
an approximation (the preconditioned gradient is not low-rank in general: the element-wise
eigenvalue weighting of K-FAC / EK-FAC breaks the rank of the T-token gradient), measured in
``docs/performance.md``.

The factorisation is a seeded randomised SVD (Halko, Martinsson & Tropp 2011, Algorithm 4.4:
a range finder with ``POWER_ITERATIONS`` subspace iterations and ``OVERSAMPLE`` extra
columns), so a rank equal to the layer's smaller side is exact up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdatune.features.capture import Captured, CapturedLayer, EmbeddingRule
from tdatune.features.factored import formed, input_factor, layer_factors

OVERSAMPLE = 8  # extra columns of the range finder
POWER_ITERATIONS = 2  # subspace iterations (sharpen a slowly decaying spectrum)
PRODUCT_BUDGET = 1 << 24  # numbers of one [g, b, T, r] intermediate of the products


@dataclass
class LowRank:
    """Weighted explained gradients of one Kronecker layer, W_j ~ left_j @ right_j."""

    left: torch.Tensor  # [g, out, r]
    right: torch.Tensor  # [g, r, in]

    @property
    def rows(self) -> int:
        """Number of explained examples g."""
        return int(self.left.shape[0])

    def dense(self) -> torch.Tensor:
        """The product left @ right, [g, out, in]."""
        return self.left @ self.right


def compresses(rank: int, d_out: int, d_in: int) -> bool:
    """Whether rank-``rank`` factors hold fewer numbers than the [out, in] matrix."""
    return rank * (d_out + d_in) < d_out * d_in


def low_rank(w: torch.Tensor, rank: int, *, seed: int = 0) -> LowRank:
    """The best rank-``rank`` approximation of each matrix of ``w`` [g, out, in], by a seeded
    randomised SVD (exact when ``rank`` is at least the smaller side)."""
    d_out, d_in = w.shape[1:]
    r = min(rank, d_out, d_in)
    k = min(r + OVERSAMPLE, d_out, d_in)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(d_in, k, generator=gen, dtype=w.dtype).to(w.device)
    q = torch.linalg.qr(w @ omega).Q  # [g, out, k]
    wt = w.transpose(1, 2)
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(w @ torch.linalg.qr(wt @ q).Q).Q
    u, s, vh = torch.linalg.svd(q.transpose(1, 2) @ w, full_matrices=False)
    return LowRank(((q @ u[:, :, :r]) * s[:, None, :r]).contiguous(), vh[:, :r, :].contiguous())


def factors_are_cheaper(g: int, b: int, t: int, r: int, d_out: int, d_in: int) -> bool:
    """The FLOP rule of :func:`low_rank_products` for g explained and b training examples of
    T positions: from the factors g b T r (out + in); from the formed M, b T out in to form
    them, g r out in to rebuild the g dense W once for the batch, and g b out in for the
    products."""
    return g * b * t * r * (d_out + d_in) < b * t * d_out * d_in + g * d_out * d_in * (r + b)


def low_rank_products(layer: CapturedLayer, captured: Captured, w: LowRank) -> torch.Tensor:
    """[g, b] inner products <W_j, M_i> of the explained examples' low-rank W and a captured
    batch's gradients of ``layer``: from the factors (module docstring) when the FLOP rule
    says so, else from the formed M against W rebuilt a few explained examples at a time."""
    f = layer_factors(layer, captured)
    d_out, r, d_in = w.left.shape[1], w.left.shape[2], w.right.shape[2]
    if f is None or not factors_are_cheaper(w.rows, captured.b, f[1].shape[1], r, d_out,
                                             d_in):
        rows = formed(layer, captured).reshape(captured.b, -1)
        out = rows.new_empty(w.rows, captured.b)
        step = max(1, PRODUCT_BUDGET // max(1, d_out * d_in))
        for j in range(0, w.rows, step):
            sl = slice(j, j + step)
            out[sl] = (w.left[sl] @ w.right[sl]).reshape(-1, rows.shape[1]).to(rows) @ rows.T
        return out
    a, delta = f
    left, right = w.left.to(delta), w.right.to(delta)
    b, t = delta.shape[:2]
    out = delta.new_empty(w.rows, b)
    step = max(1, PRODUCT_BUDGET // max(1, b * t * r))
    embedding = isinstance(layer.rule, EmbeddingRule)
    x = a if embedding else input_factor(layer, a, delta)
    for j in range(0, w.rows, step):
        sl = slice(j, j + step)
        lhs = torch.einsum("bto,gor->gbtr", delta, left[sl])
        if embedding:  # one-hot inputs: right[:, :, token]
            rhs = right[sl][:, :, x].permute(0, 2, 3, 1)
        else:
            rhs = torch.einsum("bti,gri->gbtr", x, right[sl])
        out[sl] = (lhs * rhs).sum((2, 3))
    return out


__all__ = ["LowRank", "compresses", "factors_are_cheaper", "low_rank", "low_rank_products"]
