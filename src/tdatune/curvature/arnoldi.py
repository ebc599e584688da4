"""The top eigenpairs of a symmetric operator known only through matrix-vector products
(Hessian-vector products): Lanczos with full reorthogonalisation (the symmetric case of
Arnoldi), as dattri's and pyDVL's Arnoldi influence use it.

``iters`` Krylov steps from a seeded random start build an orthonormal basis Q [p, iters] and
the tridiagonal T = Q^T H Q; the Ritz pairs of T give the eigenpairs of H whose eigenvalues
converge first, the extreme ones. The ``k`` largest are returned. Full reorthogonalisation
costs p x iters^2 but keeps Q orthonormal, so no ghost copies of converged eigenvalues appear;
with iters = p the result is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def top_eigenpairs(matvec: Callable[[torch.Tensor], torch.Tensor], p: int, k: int, *,
                   iters: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float64,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues [k] descending, eigenvectors [p, k]) of the k largest eigenvalues of the
    symmetric operator ``matvec`` ([p] -> [p]), from ``iters`` (default min(p, 2k + 20))
    Lanczos steps."""
    if not 1 <= k <= p:
        raise ValueError(f"k must be between 1 and p={p}, got {k}")
    steps = min(p, iters if iters is not None else 2 * k + 20)
    if steps < k:
        raise ValueError(f"iters={steps} Lanczos steps cannot give k={k} eigenpairs; "
                         f"use iters >= k")
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(p, generator=gen, dtype=torch.float64).to(device, dtype)
    basis = torch.zeros(p, steps, dtype=dtype, device=device)
    alphas, betas = [], []
    q = q / q.norm()
    for j in range(steps):
        basis[:, j] = q
        w = matvec(q).to(dtype)
        alpha = torch.dot(q, w)
        w = w - basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)  # full reorthogonalisation, twice
        w = w - basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        alphas.append(alpha)
        beta = w.norm()
        if j + 1 == steps:
            break
        if float(beta) <= 1e-12 * max(1.0, float(alpha.abs())):  # invariant subspace: restart
            w = torch.randn(p, generator=gen, dtype=torch.float64).to(device, dtype)
            w = w - basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
            betas.append(torch.zeros((), dtype=dtype, device=device))
            q = w / w.norm()
            continue
        betas.append(beta)
        q = w / beta
    m = len(alphas)
    tri = torch.diag(torch.stack(alphas))
    if m > 1:
        off = torch.stack(betas[: m - 1])
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tri)
    order = torch.argsort(values, descending=True)[:k]
    return values[order], basis[:, :m] @ vectors[:, order]


__all__ = ["top_eigenpairs"]
