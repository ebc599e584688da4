"""Arnoldi (Lanczos) eigenpairs and IF Arnoldi against dense eigendecompositions computed
here with torch.linalg.eigh."""

from __future__ import annotations

import pytest
import torch

from attr_problems import dense_hessian, loop_grads, problem, rel_err
from tdatune.attributors import make_attributor
from tdatune.curvature.arnoldi import top_eigenpairs


def test_top_eigenpairs_of_a_symmetric_matrix():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    values = torch.cat([torch.tensor([50.0, 20.0, 10.0, 5.0, 2.0]),
                        torch.linspace(-1.0, 0.5, 35)]).double()
    a = q @ torch.diag(values) @ q.T
    sigma, u = top_eigenpairs(lambda v: a @ v, 40, 5, iters=40)
    torch.testing.assert_close(sigma, values[:5])
    torch.testing.assert_close((u.T @ a @ u), torch.diag(values[:5]), atol=1e-8, rtol=0)
    few, _ = top_eigenpairs(lambda v: a @ v, 40, 3, iters=25)  # not all p steps: extremes first
    torch.testing.assert_close(few, values[:3], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="iters >= k"):
        top_eigenpairs(lambda v: a @ v, 40, 10, iters=5)


@pytest.mark.parametrize("rank", [6, 40])
def test_if_arnoldi_equals_the_dense_top_k_inverse(rank):
    """-v U_k (S_k + lam)^-1 U_k^T g with the k largest (positive) eigenpairs of the dense
    Hessian of the training objective."""
    prob = problem("lr", n_train=40)
    h = dense_hessian(prob)
    p = h.shape[0]
    values, vectors = torch.linalg.eigh(h)
    order = torch.argsort(values, descending=True)[: min(rank, p)]
    keep = order[values[order] > 0]
    u, s = vectors[:, keep], values[keep]
    v = loop_grads(prob, prob.explained, "output")
    g = loop_grads(prob, prob.train, "loss")
    att = make_attributor("if_arnoldi", rank=rank, iters=p).fit(prob.context)
    torch.testing.assert_close(att.sigma, s, rtol=1e-6, atol=1e-9)
    for lam in (1e-3, 1e-1):
        want = -(v @ u) @ torch.diag(1 / (s + lam)) @ (u.T @ g.T)
        assert rel_err(att.score(prob.explained, lam=lam).double(), want) < 1e-4
