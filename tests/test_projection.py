"""Seeded random projections: blockwise generation equals the whole matrix, scaling, errors."""

from __future__ import annotations

import math

import pytest
import torch

import tdatune.features.projection as projection
from tdatune.features.projection import Projector


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_streamed_projection_equals_materialised_matrix(monkeypatch, kind):
    p, d = 2 * projection.BLOCK_ROWS + 37, 16
    g = torch.randn(5, p)
    cached = Projector(p, d, kind=kind, seed=4)
    assert cached._cached is not None
    monkeypatch.setattr(projection, "CACHE_LIMIT", 0)
    streamed = Projector(p, d, kind=kind, seed=4)
    assert streamed._cached is None
    torch.testing.assert_close(streamed.project(g), g @ cached.matrix(), rtol=1e-4, atol=1e-4)


def test_rademacher_entries_and_gaussian_scale():
    r = Projector(300, 25, kind="rademacher", seed=1).matrix()
    assert set(torch.unique(r * math.sqrt(25)).tolist()) == {-1.0, 1.0}
    gmat = Projector(4000, 400, kind="gaussian", seed=1).matrix()
    assert abs(float(gmat.pow(2).sum(1).mean()) - 1.0) < 0.02  # E[P P^T] = I


def test_seed_determines_projection():
    a = Projector(100, 10, seed=1).matrix()
    assert torch.equal(a, Projector(100, 10, seed=1).matrix())
    assert not torch.equal(a, Projector(100, 10, seed=2).matrix())


def test_projection_dim_larger_than_p_is_refused():
    with pytest.raises(ValueError, match="projection dim"):
        Projector(10, 11)
    with pytest.raises(ValueError, match="choose one of"):
        Projector(10, 5, kind="sparse")
