"""Eigensystem of the empirical Fisher F = G^T G / n, in whichever form is smaller.

Parameter form (p <= n): eigh of the p x p matrix F. Kernel form (n < p): eigh of the
n x n Gram matrix K = G G^T / n, which has the same non-zero eigenvalues sigma_k; the
eigenvectors of F are u_k = G^T w_k / sqrt(n sigma_k). Training gradients lie in the row
space of G, so the null space of F never contributes to v^T (F + lambda I)^-1 g_i and both
forms give the same scores. Eigenvalues at or below ``rtol * max(sigma)`` count as zero and
are dropped. The decomposition runs in float64 by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from tdatune.utils.checks import check_choice, check_finite_rows

FORMS = ("auto", "parameter", "kernel")


class RowSource(Protocol):
    """Anything with a shape whose row slices become tensors: a tensor, np.memmap, a store."""

    shape: tuple[int, ...]

    def __getitem__(self, index: slice) -> torch.Tensor | np.ndarray: ...


def _rows(source: RowSource, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    block = source[start:stop]
    if not isinstance(block, torch.Tensor):  # copy: memory-mapped stores are read-only
        block = torch.from_numpy(np.array(block, copy=True))
    return block.to(dtype)


@dataclass
class Eigensystem:
    """Non-zero eigenvalues ``sigma`` [k] (descending) of F and the training gradients in its
    eigenbasis, ``train_coords`` [n, k] (= G U).

    Parameter form keeps the eigenvectors ``basis`` [p, k]. Kernel form never builds them
    (U = G^T W / sqrt(n sigma) would cost n p k flops and p k float64 numbers): explained
    gradients are mapped as V U = (V G^T) W / sqrt(n sigma), streaming G's rows."""

    sigma: torch.Tensor
    train_coords: torch.Tensor
    form: str
    n: int
    basis: torch.Tensor | None = None
    grads: RowSource | None = field(default=None, repr=False)
    kernel_vectors: torch.Tensor | None = field(default=None, repr=False)
    chunk_rows: int = 2048

    @property
    def dim(self) -> int:
        """Width p (or d) of the gradients this eigensystem was built on."""
        if self.basis is None and self.grads is None:
            raise ValueError("this eigensystem was built from a Gram matrix: map explained "
                             "gradients with coords_from_products(V G^T)")
        return int(self.basis.shape[0]) if self.basis is not None else int(self.grads.shape[1])

    def coords_from_products(self, vg: torch.Tensor) -> torch.Tensor:
        """Coordinates [m, k] of explained gradients given only their products with the
        training gradients, ``vg`` = V G^T [m, n] (kernel form)."""
        if self.kernel_vectors is None:
            raise ValueError("coords_from_products needs the kernel form")
        if vg.shape[-1] != self.n:
            raise ValueError(f"products have {vg.shape[-1]} columns, training examples {self.n}")
        return (vg.to(self.sigma.dtype) @ self.kernel_vectors) / torch.sqrt(self.n * self.sigma)

    def coords(self, v: torch.Tensor) -> torch.Tensor:
        """Coordinates of gradients ``v`` [m, p] in the eigenbasis: V U, shape [m, k]."""
        if v.shape[-1] != self.dim:
            raise ValueError(
                f"explained gradients have {v.shape[-1]} columns but the eigensystem was built on "
                f"{self.dim} (same projection and parameters are needed)"
            )
        dtype = self.sigma.dtype
        if self.basis is not None:
            return v.to(dtype) @ self.basis
        v = v.to(dtype)
        out = torch.zeros(v.shape[0], self.sigma.numel(), dtype=dtype)
        for s in range(0, self.n, self.chunk_rows):
            g = _rows(self.grads, s, min(self.n, s + self.chunk_rows), dtype)
            out += (v @ g.T) @ self.kernel_vectors[s : s + g.shape[0]]
        return out / torch.sqrt(self.n * self.sigma)

    def nonzero_quantile(self, q: float) -> float:
        """The q-quantile of the (non-zero) eigenvalues."""
        return float(torch.quantile(self.sigma, q))


def fisher_eigensystem(
    grads: RowSource, *, form: str = "auto", dtype: torch.dtype = torch.float64,
    chunk_rows: int = 2048, rtol: float = 1e-10,
) -> Eigensystem:
    """Eigendecompose F = G^T G / n for training gradients G ([n, p], rows read in chunks)."""
    check_choice("eigensystem form", form, FORMS)
    n, p = int(grads.shape[0]), int(grads.shape[1])
    if n == 0:
        raise ValueError("no training gradients: the training set is empty")
    if form == "auto":
        form = "parameter" if p <= n else "kernel"
    if form == "parameter":
        fisher = torch.zeros(p, p, dtype=dtype)
        for s in range(0, n, chunk_rows):
            g = _rows(grads, s, min(n, s + chunk_rows), dtype)
            check_finite_rows("training gradients", g, offset=s)
            fisher += g.T @ g
        fisher /= n
        sigma, basis = torch.linalg.eigh(fisher)
        sigma, basis = sigma.flip(0), basis.flip(1)
        keep = sigma > rtol * sigma[0].clamp_min(torch.finfo(dtype).tiny)
        sigma, basis = sigma[keep], basis[:, keep]
        coords = torch.cat([_rows(grads, s, min(n, s + chunk_rows), dtype) @ basis
                            for s in range(0, n, chunk_rows)])
        return Eigensystem(sigma=sigma, train_coords=coords, form=form, n=n, basis=basis,
                           chunk_rows=chunk_rows)

    gram = torch.zeros(n, n, dtype=dtype)
    for i in range(0, n, chunk_rows):
        gi = _rows(grads, i, min(n, i + chunk_rows), dtype)
        check_finite_rows("training gradients", gi, offset=i)
        for j in range(0, i + 1, chunk_rows):
            gj = gi if j == i else _rows(grads, j, min(n, j + chunk_rows), dtype)
            block = gi @ gj.T
            gram[i : i + gi.shape[0], j : j + gj.shape[0]] = block
            gram[j : j + gj.shape[0], i : i + gi.shape[0]] = block.T
    return gram_eigensystem(gram, grads=grads, rtol=rtol, chunk_rows=chunk_rows)


def gram_eigensystem(gram: torch.Tensor, *, grads: RowSource | None = None,
                     rtol: float = 1e-10, chunk_rows: int = 2048) -> Eigensystem:
    """Kernel-form eigensystem from the Gram matrix G G^T [n, n] (any dtype; solved in
    gram's). Without ``grads`` explained gradients are mapped by
    :meth:`Eigensystem.coords_from_products`."""
    n = int(gram.shape[0])
    if n == 0:
        raise ValueError("no training gradients: the training set is empty")
    check_finite_rows("training Gram matrix", gram)
    sigma, w = torch.linalg.eigh(gram / n)
    sigma, w = sigma.flip(0), w.flip(1)
    keep = sigma > rtol * sigma[0].clamp_min(torch.finfo(gram.dtype).tiny)
    sigma, w = sigma[keep], w[:, keep]
    return Eigensystem(sigma=sigma, train_coords=w * torch.sqrt(n * sigma), form="kernel", n=n,
                       grads=grads, kernel_vectors=w, chunk_rows=chunk_rows)
