"""The compressed spectrum behind select_lambda and mean_indicator against the exact xi sums,
written out here as direct float64 sums (no package function computes the reference).

Stated tolerance: on every spectrum, mean xi (and every example's xi) is within the spectrum's
``error_bound`` of the exact value, and that bound is below 2e-9 at the defaults (6 moments,
bins of relative half-width 2%); 1e-12 is allowed on top for float64 rounding. The selected
lambda then agrees to |d log lambda| <= 2 (bound + 1e-12) / |d xi_mean / d log lambda| + 1e-9,
which on these spectra is below 1e-6 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from tdatune.select import mean_indicator, select_lambda
from tdatune.select.compressed import EXACT_BELOW, HALF_WIDTH, CompressedSpectrum

TOL = 2e-9  # the stated bound on |xi - exact xi| at the defaults
ROUNDING = 1e-12


def exact_xi(sigma: torch.Tensor, c: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """S2 / sqrt(S1 S3), S_p = sum_k sigma_k c_jk^2 / (sigma_k + lambda)^p, as direct float64
    sums; NaN rows where every weight is zero."""
    w = sigma[None, :] * c.double() ** 2
    w = w / w.amax(dim=1, keepdim=True).clamp_min(1e-300)
    s = [torch.zeros(c.shape[0], lam.shape[0], dtype=torch.float64) for _ in range(3)]
    for start in range(0, sigma.shape[0], 4096):  # chunks of eigenvalues bound the memory
        part = 1.0 / (sigma[start:start + 4096, None] + lam[None, :])
        for p in range(3):
            s[p] += w[:, start:start + 4096] @ part ** (p + 1)
    xi = s[1] / torch.sqrt(s[0] * s[2])
    xi[(w == 0).all(dim=1)] = float("nan")
    return xi


def exact_mean(sigma: torch.Tensor, c: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    xi = exact_xi(sigma, c, lam)
    return xi[~torch.isnan(xi[:, 0])].mean(dim=0)


def exact_selection(sigma: torch.Tensor, c: torch.Tensor, threshold: float,
                    grid: torch.Tensor) -> float:
    """First grid crossing of the exact mean xi, then bisection in log lambda to 1e-12."""
    curve = exact_mean(sigma, c, grid)
    first = int((curve >= threshold).nonzero()[0, 0])
    assert first > 0
    lo, hi = math.log(grid[first - 1].item()), math.log(grid[first].item())
    while hi - lo > 1e-12:
        mid = 0.5 * (lo + hi)
        at_mid = exact_mean(sigma, c, torch.tensor([math.exp(mid)], dtype=torch.float64))
        lo, hi = (lo, mid) if at_mid.item() >= threshold else (mid, hi)
    return math.exp(hi)


def twelve_decades(seed: int, k: int = 20_000, m: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues log-uniform over 1e-12 .. 1, Cauchy (heavy-tailed) coordinates."""
    gen = torch.Generator().manual_seed(seed)
    sigma = 10.0 ** (-12.0 * torch.rand(k, generator=gen, dtype=torch.float64))
    c = (torch.randn(m, k, generator=gen, dtype=torch.float64)
         / torch.randn(m, k, generator=gen, dtype=torch.float64))
    return sigma, c


GRID = torch.logspace(-15, 3, 200, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1])
def test_mean_xi_over_twelve_decades_within_the_stated_bound(seed):
    sigma, c = twelve_decades(seed)
    spectrum = CompressedSpectrum(sigma, c)
    assert not spectrum.exact and spectrum.bins < sigma.shape[0] // 10
    assert spectrum.half_width <= HALF_WIDTH * (1 + 1e-9)
    assert spectrum.error_bound < TOL
    reference = exact_xi(sigma, c, GRID)
    assert (spectrum.xi(GRID) - reference).abs().max().item() <= spectrum.error_bound + ROUNDING
    mean, dropped = mean_indicator(sigma, c, GRID)
    assert dropped == 0
    assert (mean - reference.mean(dim=0)).abs().max().item() <= spectrum.error_bound + ROUNDING


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9])
def test_selected_lambda_matches_the_exact_crossing(threshold):
    sigma, c = twelve_decades(2)
    bound = CompressedSpectrum(sigma, c).error_bound
    selection = select_lambda(sigma, c, threshold=threshold, grid=GRID)
    assert selection.status == "crossed"
    reference = exact_selection(sigma, c, threshold, GRID)
    step = 1e-4
    around = torch.tensor([reference * math.exp(-step), reference * math.exp(step)],
                          dtype=torch.float64)
    slope = (exact_mean(sigma, c, around).diff().abs().item()) / (2 * step)
    allowed = 2 * (bound + ROUNDING) / slope + 1e-9
    assert allowed < 1e-6
    assert abs(math.log(selection.lam / reference)) <= allowed
    assert (selection.xi_mean - exact_mean(sigma, c, GRID)).abs().max().item() <= bound + ROUNDING


def test_bound_is_nearly_attained_when_weight_sits_at_bin_edges():
    """All weight on the top member of bins whose two members sit at both bin edges: the
    truncation error is then of the size the bound states (so a missing moment shows)."""
    ratio = (1 + HALF_WIDTH) / (1 - HALF_WIDTH)  # bins: log-spaced from the smallest eigenvalue
    smallest = 1e-12
    n = torch.arange(2, 600, 2, dtype=torch.float64)
    edges_lo, edges_hi = smallest * ratio**n * (1 + 1e-9), smallest * ratio ** (n + 1) * (1 - 1e-9)
    sigma = torch.cat([torch.tensor([smallest], dtype=torch.float64), edges_lo, edges_hi])
    gen = torch.Generator().manual_seed(5)
    c = torch.zeros(8, sigma.shape[0], dtype=torch.float64)
    c[:, 1 + n.shape[0]:] = (torch.randn(8, n.shape[0], generator=gen, dtype=torch.float64)
                             / torch.randn(8, n.shape[0], generator=gen, dtype=torch.float64))
    spectrum = CompressedSpectrum(sigma, c, exact=False)
    assert spectrum.bins == n.shape[0] + 1 and spectrum.half_width > 0.99 * HALF_WIDTH
    lam = torch.logspace(-16, 2, 300, dtype=torch.float64)
    err = (spectrum.xi(lam) - exact_xi(sigma, c, lam)).abs().max().item()
    assert spectrum.error_bound / 20 <= err <= spectrum.error_bound + ROUNDING


def test_exact_zero_eigenvalues_and_all_zero_examples():
    sigma, c = twelve_decades(3, k=12_000, m=30)
    gen = torch.Generator().manual_seed(4)
    zeros = torch.rand(sigma.shape[0], generator=gen) < 0.3
    sigma[zeros] = 0.0
    c[3] = 0.0  # no weight at all
    c[7] = torch.where(zeros, c[7], torch.zeros_like(c[7]))  # weight only on zero eigenvalues
    spectrum = CompressedSpectrum(sigma, c)
    assert not spectrum.exact and spectrum.k == int((~zeros).sum())
    reference = exact_xi(sigma, c, GRID)
    assert torch.isnan(reference[[3, 7]]).all()
    xi = spectrum.xi(GRID)
    assert torch.equal(torch.isnan(xi), torch.isnan(reference))
    defined = ~torch.isnan(reference[:, 0])
    assert (xi[defined] - reference[defined]).abs().max().item() <= spectrum.error_bound + ROUNDING
    mean, dropped = mean_indicator(sigma, c, GRID)
    assert dropped == 2
    assert (mean - reference[defined].mean(0)).abs().max().item() <= spectrum.error_bound + ROUNDING
    assert select_lambda(sigma, c, grid=GRID).n_dropped == 2


def test_all_weight_on_one_eigenvalue_gives_xi_one():
    sigma, _ = twelve_decades(6)
    c = torch.zeros(4, sigma.shape[0], dtype=torch.float64)
    for row, col in enumerate([10, 500, 7_000, 19_999]):  # inside crowded bins
        c[row, col] = 3.0 ** row
    spectrum = CompressedSpectrum(sigma, c)
    assert not spectrum.exact
    xi = spectrum.xi(GRID)
    assert (xi - 1.0).abs().max().item() <= spectrum.error_bound + ROUNDING
    selection = select_lambda(sigma, c, threshold=0.99, grid=GRID)
    assert selection.status == "below-grid" and selection.lam == GRID[0].item()


def test_bins_with_a_single_eigenvalue_are_exact():
    gen = torch.Generator().manual_seed(7)
    crowded = 10.0 ** (-6.0 - 2.0 * torch.rand(15_000, generator=gen, dtype=torch.float64))
    isolated = torch.logspace(-3, 2, 60, dtype=torch.float64)  # ratio 1.215 > the bin ratio
    sigma = torch.cat([crowded, isolated])
    c = torch.randn(20, sigma.shape[0], generator=gen, dtype=torch.float64)
    spectrum = CompressedSpectrum(sigma, c)
    assert not spectrum.exact
    alone = torch.isin(spectrum.centres, isolated)
    assert int(alone.sum()) == 60 and bool((spectrum.counts[alone] == 1).all())
    reference = exact_xi(sigma, c, GRID)
    assert (spectrum.xi(GRID) - reference).abs().max().item() <= spectrum.error_bound + ROUNDING
    # weight only on the isolated eigenvalues: the compressed sums are the exact sums
    only_isolated = c.clone()
    only_isolated[:, : crowded.shape[0]] = 0.0
    xi = CompressedSpectrum(sigma, only_isolated).xi(GRID)
    torch.testing.assert_close(xi, exact_xi(sigma, only_isolated, GRID), rtol=1e-12, atol=1e-13)


def test_small_spectra_keep_the_exact_sums():
    sigma, c = twelve_decades(8, k=EXACT_BELOW - 1, m=10)
    spectrum = CompressedSpectrum(sigma, c)
    assert spectrum.exact and spectrum.bins == sigma.shape[0] and spectrum.error_bound == 0.0
    torch.testing.assert_close(spectrum.xi(GRID), exact_xi(sigma, c, GRID), rtol=1e-12, atol=1e-13)
    reference = exact_selection(sigma, c, 0.5, GRID)
    assert select_lambda(sigma, c, grid=GRID).lam == pytest.approx(reference, rel=1e-9)
    # bins that would not halve the work: exact too (a spectrum of widely spread eigenvalues)
    spread = torch.logspace(-200, 0, 5000, dtype=torch.float64)
    assert CompressedSpectrum(spread, torch.ones(2, 5000, dtype=torch.float64)).exact


def test_no_positive_eigenvalue_leaves_every_example_undefined():
    spectrum = CompressedSpectrum(torch.zeros(5, dtype=torch.float64), torch.ones(3, 5))
    assert not bool(spectrum.defined.any()) and torch.isnan(spectrum.xi([1.0])).all()
    with pytest.raises(ValueError, match="undefined"):
        spectrum.mean_xi([1.0])
