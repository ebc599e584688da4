"""The surrogate indicator and Algorithm 1 against dense matrix formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tdatune.curvature.eigen import fisher_eigensystem
from tdatune.select import (
    default_lambda_grid,
    mean_indicator,
    quantile_lambda,
    select_lambda,
    surrogate_indicator,
)


def _dense_xi(fisher: torch.Tensor, v: torch.Tensor, lam: float) -> float:
    a = torch.linalg.inv(fisher + lam * torch.eye(fisher.shape[0], dtype=fisher.dtype))
    q = lambda m: float(v @ fisher @ m @ v)  # noqa: E731
    return q(a @ a) / math.sqrt(q(a) * q(a @ a @ a))


def test_indicator_equals_dense_matrix_formula():
    torch.manual_seed(0)
    g = torch.randn(30, 8, dtype=torch.float64) * torch.logspace(-2, 1, 8, dtype=torch.float64)
    v = torch.randn(5, 8, dtype=torch.float64)
    eig = fisher_eigensystem(g)
    fisher = g.T @ g / 30
    lambdas = [1e-4, 1e-2, 1.0, 30.0]
    xi = surrogate_indicator(eig.sigma, eig.coords(v), lambdas)
    assert xi.shape == (5, 4)
    for j in range(5):
        for k, lam in enumerate(lambdas):
            assert xi[j, k].item() == pytest.approx(_dense_xi(fisher, v[j], lam), rel=1e-9)


def test_indicator_in_unit_interval_and_tends_to_one():
    gen = torch.Generator().manual_seed(3)
    sigma = torch.rand(50, generator=gen, dtype=torch.float64) ** 4
    c = torch.randn(20, 50, generator=gen, dtype=torch.float64)
    xi = surrogate_indicator(sigma, c, torch.logspace(-8, 4, 60, dtype=torch.float64))
    assert bool((xi >= 0).all()) and bool((xi <= 1).all())
    assert bool((surrogate_indicator(sigma, c, [1e9]) > 1 - 1e-6).all())


def test_indicator_is_not_monotone_for_separated_eigenvalues():
    xi = surrogate_indicator(torch.tensor([1e-4, 1.0], dtype=torch.float64),
                             torch.tensor([[1.0, 0.01]], dtype=torch.float64),
                             torch.logspace(-7, 3, 400, dtype=torch.float64))[0]
    assert bool((xi.diff() < -1e-3).any()), "expected a dip between the two eigenvalues"


def test_zero_weights_give_nan_and_are_dropped():
    sigma = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)
    c = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0.5, 0.1, 2.0]], dtype=torch.float64)
    xi = surrogate_indicator(sigma, c, [0.1, 1.0])
    assert torch.isnan(xi[1]).all() and torch.isfinite(xi[[0, 2]]).all()
    mean, dropped = mean_indicator(sigma, c, [0.1])
    assert dropped == 1
    assert mean.item() == pytest.approx(xi[[0, 2], 0].mean().item())
    assert select_lambda(sigma, c).n_dropped == 1


def test_selection_is_refined_off_grid_at_the_threshold():
    gen = torch.Generator().manual_seed(1)
    sigma = torch.logspace(-6, 0, 40, dtype=torch.float64)
    c = torch.randn(15, 40, generator=gen, dtype=torch.float64)
    grid = default_lambda_grid(sigma, num=25)
    sel = select_lambda(sigma, c, threshold=0.5, grid=grid)
    assert sel.status == "crossed"
    assert not torch.isclose(grid, torch.tensor(sel.lam, dtype=torch.float64)).any()
    xi_at = surrogate_indicator(sigma, c, [sel.lam]).mean().item()
    assert xi_at == pytest.approx(0.5, abs=1e-6)
    below = torch.logspace(math.log10(grid[0].item()), math.log10(sel.lam * 0.999), 400,
                           dtype=torch.float64)
    assert bool((surrogate_indicator(sigma, c, below).mean(0) < 0.5).all())


def test_selection_takes_the_first_crossing_of_a_non_monotone_curve():
    # three widely separated eigenvalues: xi rises above 0.6, dips to about 0.1, rises again
    sigma = torch.tensor([1e-9, 1e-5, 1.0], dtype=torch.float64)
    c = torch.tensor([[0.01, 1.0, 1.0]], dtype=torch.float64)
    dense = torch.logspace(-12, 4, 4000, dtype=torch.float64)
    xi = surrogate_indicator(sigma, c, dense)[0]
    threshold = 0.6
    crossings = ((xi[:-1] < threshold) & (xi[1:] >= threshold)).nonzero().flatten()
    assert crossings.numel() >= 2, "the crafted curve must cross the threshold twice"
    sel = select_lambda(sigma, c, threshold=threshold, grid=dense[::10])
    first = dense[crossings[0] + 1].item()
    assert sel.lam == pytest.approx(first, rel=2e-2)


def test_quantile_baseline_uses_nonzero_eigenvalues():
    sigma = torch.tensor([0.0, 0.0, 1e-3, 1e-2, 1e-1, 1.0], dtype=torch.float64)
    expected = float(np.quantile([1e-3, 1e-2, 1e-1, 1.0], 0.25))
    assert quantile_lambda(sigma, 0.25) == pytest.approx(expected)


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5, -0.1])
def test_threshold_outside_unit_interval_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold"):
        select_lambda(torch.ones(3, dtype=torch.float64), torch.ones(2, 3), threshold=threshold)


def test_bad_lambda_and_shapes_are_refused():
    sigma = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="lambda must be"):
        surrogate_indicator(sigma, torch.ones(2, 3), [1.0, 0.0])
    with pytest.raises(ValueError, match="lambda must be"):
        surrogate_indicator(sigma, torch.ones(2, 3), [-1.0])
    with pytest.raises(ValueError, match="shape"):
        surrogate_indicator(sigma, torch.ones(2, 4), [1.0])
    with pytest.raises(ValueError, match="quantile"):
        quantile_lambda(sigma, 1.0)
