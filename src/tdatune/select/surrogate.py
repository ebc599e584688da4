"""The surrogate indicator xi and Algorithm 1.

With weights w_k = sigma_k c_k^2 (c = explained gradient in F's eigenbasis),

    xi(lambda) = S2 / sqrt(S1 S3),   S_j = sum_k w_k / (sigma_k + lambda)^j,

which lies in [0, 1] by Cauchy-Schwarz and tends to 1 as lambda grows. It is *not*
monotone in general, so Algorithm 1 scans a fine log grid for the first crossing of the
threshold and refines only inside that bracket by bisection in log lambda.

``select_lambda`` and ``mean_indicator`` evaluate the sums on a ``CompressedSpectrum``
(``tdatune.select.compressed``): one O(m k) pass, then O(m x bins) per lambda, within a stated
bound (~2e-9 on xi) of the exact formula; small spectra keep the exact sums.
``surrogate_indicator`` always computes the exact sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tdatune.select.compressed import CompressedSpectrum
from tdatune.select.compressed import check_spectrum as _check_spectrum
from tdatune.select.quantile import ZERO_RTOL, quantile_lambda
from tdatune.select.reliability import REFERENCE_QUANTILE, Reliability, reliability
from tdatune.utils.checks import check_nonempty, check_open_unit, check_positive_lambdas


def surrogate_indicator(sigma: torch.Tensor, c: torch.Tensor,
                        lambdas: torch.Tensor | list[float] | float) -> torch.Tensor:
    """xi for every explained example and lambda: shape [m, L] (NaN where all weights are 0)."""
    sigma, c = _check_spectrum(sigma, c)
    lam = check_positive_lambdas(lambdas)
    w = sigma * c.pow(2)  # [m, k]
    scale = w.abs().amax(dim=1, keepdim=True)
    undefined = (scale <= 0).squeeze(1)
    w = w / torch.where(scale > 0, scale, torch.ones_like(scale))  # xi is scale invariant
    inv = 1.0 / (sigma[:, None] + lam[None, :])  # [k, L]
    s1 = w @ inv
    s2 = w @ inv.pow(2)
    s3 = w @ inv.pow(3)
    xi = s2 / torch.sqrt(s1 * s3)
    xi = xi.clamp(0.0, 1.0)  # removes rounding just above 1
    xi[undefined] = float("nan")
    return xi


def mean_indicator(sigma: torch.Tensor, c: torch.Tensor,
                   lambdas: torch.Tensor | list[float]) -> tuple[torch.Tensor, int]:
    """Mean of xi over the examples where it is defined, and how many were dropped.

    Evaluated on a ``CompressedSpectrum``: within its ``error_bound`` (~2e-9) of the exact mean."""
    spectrum = CompressedSpectrum(sigma, c)
    mean = spectrum.mean_xi(lambdas)
    return mean, int((~spectrum.defined).sum())


def default_lambda_grid(sigma: torch.Tensor, num: int = 200, below: float = 1e-3,
                        above: float = 1e3) -> torch.Tensor:
    """A log grid from ``below`` x the smallest non-zero eigenvalue to ``above`` x the largest.

    For an indefinite spectrum (a Hessian away from a minimum) the grid starts above twice the
    most negative eigenvalue's magnitude, so that sigma + lambda stays away from zero."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    top = float(sigma.max())
    if not top > 0:
        raise ValueError("the spectrum has no positive eigenvalue; the curvature matrix is zero")
    nonzero = sigma[sigma > ZERO_RTOL * top]
    lo, hi = float(nonzero.min()) * below, top * above
    if float(sigma.min()) < 0:
        lo = max(lo, 2.0 * abs(float(sigma.min())))
        hi = max(hi, 10.0 * lo)
    return torch.logspace(math.log10(lo), math.log10(hi), num, dtype=torch.float64)


@dataclass
class Selection:
    """Result of Algorithm 1."""

    lam: float
    threshold: float
    n_used: int
    n_dropped: int
    status: str  # "crossed", "below-grid" (already above threshold), "above-grid" (never reached);
    # "spectrum" for the rule "top"
    grid: torch.Tensor = field(repr=False)
    xi_mean: torch.Tensor = field(repr=False)
    reliability: Reliability | None = field(default=None, repr=False)
    rule: str = "xi"                 # "xi" (Algorithm 1) or "top" (select.default)
    xi_lambda: float | None = None   # Algorithm 1's lambda when the rule is another

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly summary (with the reliability signals when computed)."""
        out: dict[str, object] = {"lambda": self.lam, "threshold": self.threshold,
                                  "n_used": self.n_used, "n_dropped": self.n_dropped,
                                  "status": self.status, "rule": self.rule}
        if self.xi_lambda is not None:
            out["xi_lambda"] = self.xi_lambda
        if self.reliability is not None:
            out["reliability"] = self.reliability.to_dict()
        return out


def select_lambda(sigma: torch.Tensor, c_val: torch.Tensor, threshold: float = 0.5,
                  grid: torch.Tensor | None = None, bisection_steps: int = 60) -> Selection:
    """Algorithm 1: the smallest lambda where mean xi over the *validation* examples reaches
    ``threshold``, refined by bisection in log lambda inside the first bracketing interval.
    ``Selection.reliability`` says how far to trust it (``tdatune.select.reliability``).

    The spectrum is compressed once (``CompressedSpectrum``), so the grid scan and every
    bisection step cost O(m x bins), not O(m k); mean xi is within ~2e-9 of the exact formula."""
    return select_lambdas(sigma, c_val, [threshold], grid, bisection_steps)[0]


def select_lambdas(sigma: torch.Tensor, c_val: torch.Tensor, thresholds: list[float],
                   grid: torch.Tensor | None = None, bisection_steps: int = 60
                   ) -> list[Selection]:
    """:func:`select_lambda` at each of ``thresholds``, compressing the spectrum and computing
    the per-example xi curves for the reliability signals once for all of them."""
    for t in thresholds:
        check_open_unit("threshold", t)
    sigma, c_val = _check_spectrum(sigma, c_val)
    _check_validation_rows(c_val)
    grid = default_lambda_grid(sigma) if grid is None else check_positive_lambdas(grid).sort().values
    spectrum = CompressedSpectrum(sigma, c_val)
    if not bool(spectrum.defined.any()):
        raise ValueError("xi is undefined for every validation example (all gradients are zero)")
    xi_rows = spectrum.xi(grid).numpy()
    reference = quantile_lambda(sigma, REFERENCE_QUANTILE)
    out = []
    for t in thresholds:
        selection = _bracket_and_bisect(spectrum.mean_xi, grid, t, bisection_steps,
                                        int(spectrum.defined.sum()),
                                        int((~spectrum.defined).sum()))
        selection.reliability = reliability(grid.numpy(), xi_rows, t, selection.lam, reference)
        out.append(selection)
    return out


def _select_lambda_exact(sigma: torch.Tensor, c_val: torch.Tensor, threshold: float = 0.5,
                         grid: torch.Tensor | None = None, bisection_steps: int = 60) -> Selection:
    """``select_lambda`` with the exact sums recomputed from (sigma, c) at every lambda, O(m k)
    per grid point and per bisection step: the reference the compressed path is benchmarked
    and tested against."""
    check_open_unit("threshold", threshold)
    sigma, c_val = _check_spectrum(sigma, c_val)
    _check_validation_rows(c_val)
    grid = default_lambda_grid(sigma) if grid is None else check_positive_lambdas(grid).sort().values
    defined = ~torch.isnan(surrogate_indicator(sigma, c_val, grid[:1])[:, 0])
    if not bool(defined.any()):
        raise ValueError("xi is undefined for every validation example (all gradients are zero)")
    c_used = c_val[defined]

    def xi_bar(lam: torch.Tensor) -> torch.Tensor:
        return surrogate_indicator(sigma, c_used, lam).mean(dim=0)

    return _bracket_and_bisect(xi_bar, grid, threshold, bisection_steps, int(defined.sum()),
                               int((~defined).sum()))


def _check_validation_rows(c_val: torch.Tensor) -> None:
    check_nonempty("the validation set (c_val has 0 rows)", c_val.shape[0],
                   "select_lambda needs the eigenbasis coordinates of at least one validation "
                   "example's output gradient: use a non-empty validation split")


def _bracket_and_bisect(xi_bar: Callable[[torch.Tensor], torch.Tensor], grid: torch.Tensor,
                        threshold: float, bisection_steps: int, n_used: int,
                        n_dropped: int) -> Selection:
    """The first grid crossing of ``threshold`` by ``xi_bar``, refined by bisection in log lambda."""
    curve = xi_bar(grid)
    above = (curve >= threshold).nonzero()
    common = {"threshold": threshold, "n_used": n_used, "n_dropped": n_dropped,
              "grid": grid, "xi_mean": curve}
    if above.numel() == 0:
        return Selection(lam=float(grid[-1]), status="above-grid", **common)
    first = int(above[0, 0])
    if first == 0:
        return Selection(lam=float(grid[0]), status="below-grid", **common)
    lo, hi = math.log(float(grid[first - 1])), math.log(float(grid[first]))
    for _ in range(bisection_steps):
        mid = 0.5 * (lo + hi)
        if float(xi_bar(torch.tensor([math.exp(mid)], dtype=torch.float64))[0]) >= threshold:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-10:
            break
    return Selection(lam=math.exp(hi), status="crossed", **common)
