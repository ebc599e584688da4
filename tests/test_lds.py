"""LDS against a hand-worked example and against per-lambda score matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdatune.attributors.lambda_path import LambdaPath
from tdatune.evaluate.lds import lds, lds_path, spearman_rows, summarize


def test_lds_hand_worked_example():
    # tau = [1, 2, 3]; subsets {0,1}, {1,2}, {0,2}, {0} give predicted sums 3, 5, 4, 1
    # (ranks 2, 4, 3, 1); outputs 0.3, 0.1, 0.5, 0.2 have ranks 3, 1, 4, 2.
    # Spearman = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 12 / 60 = -0.2.
    scores = torch.tensor([[1.0, 2.0, 3.0]])
    masks = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 0, 0]], dtype=torch.bool)
    outputs = np.array([[0.3], [0.1], [0.5], [0.2]])
    result = lds(scores, masks, outputs)
    assert result.per_example[0] == pytest.approx(-0.2)
    assert result.mean == pytest.approx(-0.2)


def test_spearman_with_ties_uses_average_ranks():
    # ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; Pearson with [1, 2, 3, 4] by hand:
    a = np.array([1.0, 2.5, 2.5, 4.0]) - 2.5
    b = np.array([1.0, 2.0, 3.0, 4.0]) - 2.5
    expected = (a @ b) / np.sqrt((a @ a) * (b @ b))
    got = spearman_rows(np.array([[1.0, 2.0, 2.0, 3.0]]), np.array([[10.0, 20.0, 30.0, 40.0]]))
    assert got[0] == pytest.approx(expected)
    assert np.isnan(spearman_rows(np.ones((1, 4)), np.arange(4.0)[None]))[0]


def test_mean_and_standard_error():
    r = summarize(np.array([0.1, 0.3, np.nan, 0.5]))
    assert r.mean == pytest.approx(0.3)
    assert r.sem == pytest.approx(np.std([0.1, 0.3, 0.5], ddof=1) / np.sqrt(3))
    assert r.n_valid == 3


def test_lds_path_equals_lds_of_each_score_matrix():
    gen = torch.Generator().manual_seed(0)
    sigma = torch.logspace(-3, 0, 6, dtype=torch.float64)
    path = LambdaPath(sigma, torch.randn(4, 6, generator=gen, dtype=torch.float64),
                      torch.randn(30, 6, generator=gen, dtype=torch.float64))
    masks = torch.rand(12, 30, generator=gen) < 0.5
    outputs = np.random.default_rng(0).normal(size=(12, 4))
    lambdas = [1e-4, 1e-2, 1.0]
    for lam, res in zip(lambdas, lds_path(path, masks, outputs, lambdas), strict=True):
        direct = lds(path.scores(lam), masks, outputs)
        np.testing.assert_allclose(res.per_example, direct.per_example)


def test_lds_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        lds(torch.ones(2, 3), torch.ones(4, 3, dtype=torch.bool), np.ones((4, 3)))
