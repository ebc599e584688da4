"""Seeded random projections P (p x d, entries scaled by 1/sqrt(d)) applied as g -> P^T g.

P is defined block by block over parameter rows: rows [b*B, (b+1)*B) come from a generator
seeded by (seed, b). When p*d is small the whole matrix is cached; otherwise each block is
regenerated on the fly, so the p x d matrix never exists in memory at once.
"""

from __future__ import annotations

import math

import torch

from tdatune.utils.checks import check_choice

PROJECTION_KINDS = ("gaussian", "rademacher", "identity")
BLOCK_ROWS = 4096
CACHE_LIMIT = 1 << 26  # entries (256 MiB in float32) up to which P is cached whole


class Projector:
    """Maps rows of p-dimensional gradients to d dimensions: ``project(g) = g @ P``."""

    def __init__(self, p: int, d: int | None = None, *, kind: str = "gaussian", seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        check_choice("projection kind", kind, PROJECTION_KINDS)
        d = p if d is None or kind == "identity" else int(d)
        if kind == "identity" and d != p:
            raise ValueError(f"an identity projection keeps all {p} dimensions")
        if not 1 <= d <= p:
            raise ValueError(
                f"projection dim must be between 1 and the number of parameters p={p}, got {d}; "
                "use no projection (proj_dim=None) to keep full gradients"
            )
        self.p, self.d, self.kind, self.seed = p, d, kind, int(seed)
        self.dtype, self.device = dtype, torch.device(device)
        self._cached: torch.Tensor | None = None
        if kind != "identity" and p * d <= CACHE_LIMIT:
            self._cached = self._rows(0, p)

    def describe(self) -> dict[str, object]:
        """Manifest entry identifying this projection."""
        return {"kind": self.kind, "p": self.p, "d": self.d, "seed": self.seed,
                "block_rows": BLOCK_ROWS}

    def block(self, b: int) -> torch.Tensor:
        """Rows [b*BLOCK_ROWS, ...) of P, regenerated from (seed, b)."""
        r0 = b * BLOCK_ROWS
        r1 = min(self.p, r0 + BLOCK_ROWS)
        gen = torch.Generator().manual_seed(self.seed * 7_919 + b)
        if self.kind == "gaussian":
            mat = torch.randn(r1 - r0, self.d, generator=gen, dtype=torch.float32)
        else:
            mat = torch.randint(0, 2, (r1 - r0, self.d), generator=gen).float().mul_(2).sub_(1)
        return mat.div_(math.sqrt(self.d)).to(self.device, self.dtype)

    def _rows(self, r0: int, r1: int) -> torch.Tensor:
        b0, b1 = r0 // BLOCK_ROWS, (r1 - 1) // BLOCK_ROWS
        full = torch.cat([self.block(b) for b in range(b0, b1 + 1)])
        return full[r0 - b0 * BLOCK_ROWS : r1 - b0 * BLOCK_ROWS]

    def matrix(self) -> torch.Tensor:
        """The whole P (for tests and small p*d only)."""
        if self.kind == "identity":
            return torch.eye(self.p, dtype=self.dtype, device=self.device)
        return self._cached if self._cached is not None else self._rows(0, self.p)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """``g @ P`` for g of shape [b, p]."""
        if g.shape[-1] != self.p:
            raise ValueError(f"gradients have {g.shape[-1]} columns but the projection expects p={self.p}")
        if self.kind == "identity":
            return g
        g = g.to(self.device, self.dtype)
        if self._cached is not None:
            return g @ self._cached
        out = torch.zeros(g.shape[0], self.d, dtype=self.dtype, device=self.device)
        for b in range(math.ceil(self.p / BLOCK_ROWS)):
            r0 = b * BLOCK_ROWS
            out += g[:, r0 : r0 + BLOCK_ROWS] @ self.block(b)
        return out
