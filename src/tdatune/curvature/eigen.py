"""Eigensystem of the empirical Fisher F = G^T G / n, in whichever form is smaller.

Parameter form (p <= n): eigh of the p x p matrix F. Kernel form (n < p): eigh of the
n x n Gram matrix K = G G^T / n, which has the same non-zero eigenvalues sigma_k; the
eigenvectors of F are u_k = G^T w_k / sqrt(n sigma_k). Training gradients lie in the row
space of G, so the null space of F never contributes to v^T (F + lambda I)^-1 g_i and both
forms give the same scores. Eigenvalues at or below ``rtol * max(sigma)`` count as zero and
are dropped. The decomposition runs in float64 by default.

Top-k route (``rank``): either form keeps only its top ``rank`` eigenpairs, by randomised
subspace iteration (:func:`top_psd_eigenpairs`), and each training gradient's squared norm;
the rest of the spectrum then counts as zero curvature (``TruncatedLambdaPath``).

Memory (counted by :func:`tdatune.features.budget.estimate_attribution`): the s x s matrix
(s = p or n), scaled in place, ``torch.linalg.eigh``'s eigenvectors and LAPACK workspace
(about 3 s^2 more), then one copy of the kept eigenvectors; an eigendecomposition larger than
``EIGH_NOTICE_SIZE`` says so on stderr, with a rough time, before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from tdatune.features import budget
from tdatune.utils.atomic import notice
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
    grads: RowSource | None = field(default=None, repr=False)  # kernel or truncated form
    kernel_vectors: torch.Tensor | None = field(default=None, repr=False)
    chunk_rows: int = 2048
    train_sq: torch.Tensor | None = field(default=None, repr=False)  # |g_i|^2, when truncated

    @property
    def truncated(self) -> bool:
        """Whether only the top eigenpairs were computed (``gram_eigensystem(rank=...)``)."""
        return self.train_sq is not None

    @property
    def dim(self) -> int:
        """Width p (or d) of the gradients this eigensystem was built on."""
        if self.basis is None and self.grads is None:
            raise ValueError("this eigensystem was built from a Gram matrix: map explained "
                             "gradients with coords_from_products(V G^T)")
        if self.basis is not None:
            return int(self.basis.shape[0])
        assert self.grads is not None
        return int(self.grads.shape[1])

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

    def products(self, v: torch.Tensor) -> torch.Tensor:
        """V G^T [m, n] (float64): the gradients ``v`` [m, width] against every training
        gradient, reading G's rows in chunks (the truncated route's rest needs them)."""
        if self.grads is None:
            raise ValueError("this eigensystem keeps no training gradients; use "
                             "coords_from_products(V G^T)")
        v = v.to(torch.float64)
        out = torch.empty(v.shape[0], self.n, dtype=torch.float64)
        for s in range(0, self.n, self.chunk_rows):
            g = _rows(self.grads, s, min(self.n, s + self.chunk_rows), torch.float64)
            out[:, s : s + g.shape[0]] = v @ g.T
        return out

    def nonzero_quantile(self, q: float) -> float:
        """The q-quantile of the (non-zero) eigenvalues."""
        return float(torch.quantile(self.sigma, q))


def fisher_eigensystem(
    grads: RowSource, *, form: str = "auto", dtype: torch.dtype = torch.float64,
    chunk_rows: int = 2048, rtol: float = 1e-10, rank: int | None = None,
) -> Eigensystem:
    """Eigendecompose F = G^T G / n for training gradients G ([n, p], rows read in chunks);
    ``rank`` below the form's size: only the top ``rank`` eigenpairs
    (:func:`top_psd_eigenpairs`; the system keeps G and each |g_i|^2 for the rest)."""
    check_choice("eigensystem form", form, FORMS)
    n, p = int(grads.shape[0]), int(grads.shape[1])
    if n == 0:
        raise ValueError("no training gradients: the training set is empty")
    if form == "auto":
        form = "parameter" if p <= n else "kernel"
    if form == "parameter":
        return _parameter_form(grads, dtype=dtype, chunk_rows=chunk_rows, rtol=rtol, rank=rank)
    return gram_eigensystem(_gram(grads, dtype, chunk_rows), grads=grads, rtol=rtol,
                            chunk_rows=chunk_rows, overwrite=True, rank=rank)


def _gram(grads: RowSource, dtype: torch.dtype, chunk_rows: int) -> torch.Tensor:
    """G G^T [n, n], built from blocks of rows (each block computed once)."""
    n = int(grads.shape[0])
    gram = torch.zeros(n, n, dtype=dtype)
    for i in range(0, n, chunk_rows):
        gi = _rows(grads, i, min(n, i + chunk_rows), dtype)
        check_finite_rows("training gradients", gi, offset=i)
        for j in range(0, i + 1, chunk_rows):
            gj = gi if j == i else _rows(grads, j, min(n, j + chunk_rows), dtype)
            block = gi @ gj.T
            gram[i : i + gi.shape[0], j : j + gj.shape[0]] = block
            gram[j : j + gj.shape[0], i : i + gi.shape[0]] = block.T
    return gram


def _fisher(grads: RowSource, dtype: torch.dtype, chunk_rows: int) -> torch.Tensor:
    """F = G^T G / n [p, p], accumulated over chunks of rows in place (``addmm_``: no p x p
    product of a chunk beside it)."""
    n, p = int(grads.shape[0]), int(grads.shape[1])
    fisher = torch.zeros(p, p, dtype=dtype)
    for s in range(0, n, chunk_rows):
        g = _rows(grads, s, min(n, s + chunk_rows), dtype)
        check_finite_rows("training gradients", g, offset=s)
        fisher.addmm_(g.T, g)
    fisher /= n
    return fisher


def _parameter_form(grads: RowSource, *, dtype: torch.dtype, chunk_rows: int, rtol: float,
                    rank: int | None = None) -> Eigensystem:
    """Parameter form: eigh of F [p, p] (or its top ``rank`` eigenpairs), then G U chunk by
    chunk (F is freed before the coordinates are built)."""
    n, p = int(grads.shape[0]), int(grads.shape[1])
    fisher = _fisher(grads, dtype, chunk_rows)
    truncate = rank is not None and rank < p
    sigma, basis = _eigenpairs(fisher, "parameter", rank, rtol)
    del fisher
    coords = torch.empty(n, sigma.numel(), dtype=dtype)
    train_sq = torch.empty(n, dtype=torch.float64) if truncate else None
    for s in range(0, n, chunk_rows):
        stop = min(n, s + chunk_rows)
        coords[s:stop] = _rows(grads, s, stop, dtype) @ basis  # (the chunk freed at once)
        if train_sq is not None:
            train_sq[s:stop] = _rows(grads, s, stop, torch.float64).square().sum(1)
    return Eigensystem(sigma=sigma, train_coords=coords, form="parameter", n=n, basis=basis,
                       chunk_rows=chunk_rows, grads=grads if truncate else None,
                       train_sq=train_sq)


def _top(sigma: torch.Tensor, vectors: torch.Tensor, *, rtol: float
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenpairs of ``eigh`` (ascending) above ``rtol`` x the largest, in descending
    order: a suffix of ``eigh``'s, gathered once into a row-major copy (the layout, and so
    the rounding of every later product, of the flip-then-mask it replaces)."""
    size = sigma.numel()
    k = int((sigma > rtol * sigma[-1].clamp_min(torch.finfo(sigma.dtype).tiny)).sum())
    order = torch.arange(size - 1, size - k - 1, -1, device=sigma.device)
    return sigma[order], vectors[:, order]


def _eigenpairs(matrix: torch.Tensor, form: str, rank: int | None, rtol: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenpairs above ``rtol`` x the largest of a PSD ``matrix``, descending: its top
    ``rank`` by :func:`top_psd_eigenpairs` when ``rank`` is below its order, else all of
    them by ``eigh`` (announced when large)."""
    size = int(matrix.shape[0])
    if rank is not None and rank < size:
        return top_psd_eigenpairs(matrix, rank, rtol=rtol)
    announce_eigh(size, form, matrix.dtype)
    return _top(*torch.linalg.eigh(matrix), rtol=rtol)


def announce_eigh(size: int, form: str, dtype: torch.dtype = torch.float64) -> None:
    """Say on stderr, before it starts, that an eigendecomposition larger than
    ``budget.EIGH_NOTICE_SIZE`` will take a while: its size, memory and a rough time."""
    if size <= budget.EIGH_NOTICE_SIZE:
        return
    item = torch.empty(0, dtype=dtype).element_size()
    held = sum(budget.eigh_bytes(size, item).values())
    notice(f"eigendecomposition of a {size:,} x {size:,} matrix ({form} form, {dtype}, "
           f"{budget.format_bytes(held)} while it runs): roughly "
           f"{budget.format_seconds(budget.eigh_seconds(size))} with "
           f"{torch.get_num_threads()} torch thread(s), growing as the cube of the size; no "
           "progress is shown. A projection (proj_dim=) or K-FAC (attributor='kfac') avoids it")


def gram_eigensystem(gram: torch.Tensor, *, grads: RowSource | None = None,
                     rtol: float = 1e-10, chunk_rows: int = 2048,
                     overwrite: bool = False, rank: int | None = None) -> Eigensystem:
    """Kernel-form eigensystem from the Gram matrix G G^T [n, n] (any dtype; solved in
    gram's). Without ``grads`` explained gradients are mapped by
    :meth:`Eigensystem.coords_from_products`. ``overwrite``: scale ``gram`` in place (saves
    an n x n copy; ``gram`` then holds G G^T / n). ``rank`` < n: only the top ``rank``
    eigenpairs, by :func:`top_psd_eigenpairs` (no n x n eigendecomposition); the system
    then keeps each |g_i|^2 (``train_sq``) for what lies outside them."""
    n = int(gram.shape[0])
    if n == 0:
        raise ValueError("no training gradients: the training set is empty")
    check_finite_rows("training Gram matrix", gram)
    truncate = rank is not None and rank < n
    train_sq = gram.diagonal().to(torch.float64).clone() if truncate else None
    scaled = gram.div_(n) if overwrite else gram / n
    sigma, w = _eigenpairs(scaled, "kernel", rank, rtol)
    del scaled
    return Eigensystem(sigma=sigma, train_coords=w * torch.sqrt(n * sigma), form="kernel", n=n,
                       grads=grads, kernel_vectors=w, chunk_rows=chunk_rows, train_sq=train_sq)


POWER_ITERATIONS = 4  # subspace iterations of the top-k route (a Fisher's spectrum decays slowly)


def top_psd_eigenpairs(matrix: torch.Tensor, k: int, *, rtol: float = 1e-10, seed: int = 0,
                       iters: int = POWER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues [<= k] descending, eigenvectors [n, <= k]) of the ``k`` largest eigenpairs
    of a PSD matrix [n, n], by seeded randomised subspace iteration (Halko, Martinsson &
    Tropp 2011, Algorithms 4.4 and 5.3): ``iters`` products with an [n, k + oversample] block
    and one small eigh, n^2 (k + 10) (iters + 2) multiply-adds and a few n x (k + 10) blocks
    instead of eigh's n^3 and 3 n^2 workspace. Eigenvalues at or below ``rtol`` x the largest
    are dropped, as :func:`gram_eigensystem` does."""
    n = int(matrix.shape[0])
    cols = budget.range_columns(n, k)
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(matrix @ torch.randn(n, cols, generator=gen, dtype=matrix.dtype)).Q
    for _ in range(iters):
        q = torch.linalg.qr(matrix @ q).Q
    small = q.T @ (matrix @ q)
    values, vectors = torch.linalg.eigh((small + small.T) / 2)
    sigma, w = _top(values, vectors, rtol=rtol)
    return sigma[:k], q @ w[:, :k]
