"""A compressed eigen-spectrum on which xi costs O(m x bins) per lambda instead of O(m k).

The sums behind the surrogate indicator (see ``tdatune.select.surrogate``),

    S_p(lambda) = sum_k w_k / (sigma_k + lambda)^p,   p = 1, 2, 3,   w_k = sigma_k c_k^2 >= 0,

are evaluated on log-spaced bins of the positive eigenvalues: bin n is [s r^n, s r^(n+1)),
r = (1 + h) / (1 - h), s the smallest positive eigenvalue, and only non-empty bins are kept. A
bin's centre s0 is the midpoint of its smallest and largest member, so every member is
sigma = s0 (1 + u) with |u| <= h. Each example keeps, per bin, the moments N_j = sum w u^j for
j = 0 .. q-1 (one O(m k) pass), and in

    1 / (sigma + lambda)^p = (s0 + lambda)^-p (1 + u t)^-p,   t = s0 / (s0 + lambda) in (0, 1],

(1 + u t)^-p is expanded in powers of u t up to order q - 1. The Taylor remainder of
(1 + x)^-p after q terms is at most C(p+q-1, q) |x|^q (1 - |x|)^-(p+q) and the exact term is
at least (1 + |x|)^-p, so with |x| <= h and w >= 0 **every S_p has relative error at most**

    e_p = C(p+q-1, q) h^q (1 + h)^p / (1 - h)^(p+q),

for every lambda > 0 (less when lambda >> s0), and xi = S2 / sqrt(S1 S3), which lies in
[0, 1], has absolute (and relative) error at most e_xi = (1 + e2) / sqrt((1 - e1)(1 - e3)) - 1,
as does the mean of xi over examples (clamping xi to [0, 1] only shrinks the error). The
defaults q = 6, h = 0.02 (about 58 bins per decade of eigenvalues) give e_xi ~ 1.7e-9, which
``error_bound`` reports for the bins actually built (float64 rounding, ~1e-13, comes on top);
moments up to N_2 on 1%-wide bins would give 1.2e-6. A bin holding a single eigenvalue is
exact (u = 0).

Small spectra (fewer than ``EXACT_BELOW`` positive eigenvalues) and spectra that bins would
not compress at least two-fold keep the exact sums (each eigenvalue its own bin, N_0 = w).
Exact zero eigenvalues carry no weight and are dropped.
"""

from __future__ import annotations

import math

import torch

from tdatune.utils.checks import check_positive_lambdas, check_shape

EXACT_BELOW = 4096  # fewer positive eigenvalues than this: exact sums
ORDER = 6  # q: moments N_0 .. N_{q-1} per bin
HALF_WIDTH = 0.02  # h: largest |sigma - s0| / s0 inside a bin
_CHUNK_ELEMENTS = 1 << 22  # bound on the [q bins, 3 L] coefficient matrix per chunk of lambdas


def check_spectrum(sigma: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigma, c)`` as float64, c as [m, k]; refuses negative or non-finite input."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    c = torch.as_tensor(c, dtype=torch.float64)
    if sigma.dim() != 1:
        raise ValueError(f"sigma must be a 1-D tensor of eigenvalues, got shape {list(sigma.shape)}")
    if c.dim() == 1:
        c = c[None]
    check_shape("c (explained gradients in the eigenbasis)", c, [None, sigma.shape[0]])
    if bool((sigma < 0).any()) or not bool(torch.isfinite(sigma).all()):
        raise ValueError("sigma must hold finite eigenvalues >= 0 (of a PSD matrix)")
    # a sum is finite only if every entry is (NaN and inf propagate); only when it is not (or it
    # overflowed) look at every entry: no [m, k] temporary on the common path
    if not math.isfinite(float(c.sum())) and not bool(torch.isfinite(c).all()):
        row = int((~torch.isfinite(c)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"c has NaN or inf for explained example {row}")
    return sigma, c


def sum_error_bound(p: int, order: int, half_width: float) -> float:
    """e_p: the relative error bound on S_p for moments up to ``order - 1`` and bins of
    relative half-width ``half_width`` (0 when ``order`` terms are exact: half_width = 0)."""
    h = half_width
    if h <= 0:
        return 0.0
    return math.comb(p + order - 1, order) * h**order * (1 + h) ** p / (1 - h) ** (p + order)


class CompressedSpectrum:
    """Per-example binned moments of the weights w = sigma c^2 over the positive eigenvalues.

    Built once in O(m k); ``xi`` and ``mean_xi`` then cost O(m x bins x order) per lambda,
    within ``error_bound`` (absolute, on xi and on its mean) of the exact formula.
    ``exact=True`` forces the exact sums, ``False`` forces bins, ``None`` chooses (see module).
    """

    def __init__(self, sigma: torch.Tensor, c: torch.Tensor, *, order: int = ORDER,
                 half_width: float = HALF_WIDTH, exact: bool | None = None) -> None:
        if order < 1 or not 0.0 < half_width < 0.5:
            raise ValueError(f"need order >= 1 and 0 < half_width < 0.5, got {order}, {half_width}")
        sigma, c = check_spectrum(sigma, c)
        self.m = c.shape[0]
        positive = sigma > 0
        if not bool(positive.all()):
            sigma, c = sigma[positive], c[:, positive]
        self.k = sigma.shape[0]
        w = c.square().mul_(sigma)  # [m, k], >= 0
        self.exact, self.order, self.half_width = True, 1, 0.0
        self.centres, self.counts, moments = sigma, torch.ones_like(sigma, dtype=torch.long), w
        if self.k and (exact is False or (exact is None and self.k >= EXACT_BELOW)):
            index, lo, hi = _bins(sigma, half_width)
            n_bins = lo.shape[0]
            if exact is False or 2 * order * n_bins <= self.k:  # bins at least halve the work
                self.exact, self.order = False, order
                self.centres = 0.5 * (lo + hi)
                self.half_width = float(((hi - lo) / (hi + lo)).max())  # realised h
                self.counts = torch.bincount(index, minlength=n_bins)
                offset = (sigma - self.centres[index]) / self.centres[index]  # u, |u| <= h
                moments = w.new_zeros(self.m, order * n_bins)
                for j in range(order):  # w becomes w u^j in place (it is ours, not needed after)
                    moments[:, j * n_bins:(j + 1) * n_bins].index_add_(1, index, w)
                    if j + 1 < order:
                        w.mul_(offset)
        self.defined = moments[:, : self.bins].sum(dim=1) > 0
        moments = moments[self.defined]
        if moments.shape[0]:  # xi is scale invariant: normalise each example (no overflow)
            moments = moments / moments.abs().amax(dim=1, keepdim=True)
        self._moments = moments

    @property
    def bins(self) -> int:
        """Number of (non-empty) bins: ``k`` on the exact path."""
        return int(self.centres.shape[0])

    @property
    def error_bound(self) -> float:
        """e_xi: bound on |xi - exact xi| (and on the mean's error) for every lambda > 0."""
        e1, e2, e3 = (sum_error_bound(p, self.order, self.half_width) for p in (1, 2, 3))
        if max(e1, e3) >= 1:
            return math.inf
        return (1 + e2) / math.sqrt((1 - e1) * (1 - e3)) - 1

    def _sums(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """S_1, S_2, S_3 for the defined examples, each [m_defined, L]."""
        inv = 1.0 / (self.centres[:, None] + lam[None, :])  # [B, L]
        powers = [inv, inv * inv]
        powers.append(powers[1] * inv)
        if self.order == 1:
            kernel = torch.cat(powers, dim=1)  # [B, 3L]
        else:
            ratio = self.centres[:, None] * inv  # t in (0, 1]
            t_pow = [torch.ones_like(ratio)]
            for _ in range(1, self.order):
                t_pow.append(t_pow[-1] * ratio)
            blocks = []
            for p in (1, 2, 3):
                # coefficient of x^j in (1 + x)^-p: (-1)^j C(p+j-1, j)
                rows = [(-1) ** j * math.comb(p + j - 1, j) * t_pow[j] for j in range(self.order)]
                blocks.append(torch.cat(rows, dim=0) * powers[p - 1].repeat(self.order, 1))
            kernel = torch.cat(blocks, dim=1)  # [q B, 3L]
        sums = self._moments @ kernel
        n = lam.shape[0]
        return sums[:, :n], sums[:, n:2 * n], sums[:, 2 * n:]

    def _xi_defined(self, lambdas: torch.Tensor | list[float] | float) -> torch.Tensor:
        lam = check_positive_lambdas(lambdas)
        step = max(1, _CHUNK_ELEMENTS // (3 * self.order * max(self.bins, 1)))
        parts = []
        for start in range(0, lam.shape[0], step):
            s1, s2, s3 = self._sums(lam[start:start + step])
            parts.append((s2 / torch.sqrt(s1 * s3)).clamp(0.0, 1.0))
        return torch.cat(parts, dim=1)

    def xi(self, lambdas: torch.Tensor | list[float] | float) -> torch.Tensor:
        """xi for every example and lambda, [m, L] (NaN rows where all weights are 0)."""
        lam = check_positive_lambdas(lambdas)
        out = torch.full((self.m, lam.shape[0]), float("nan"), dtype=torch.float64)
        if bool(self.defined.any()):
            out[self.defined] = self._xi_defined(lam)
        return out

    def mean_xi(self, lambdas: torch.Tensor | list[float] | float) -> torch.Tensor:
        """Mean of xi over the examples where it is defined, [L]."""
        lambdas = check_positive_lambdas(lambdas)
        if not bool(self.defined.any()):
            raise ValueError("xi is undefined for every explained example (all gradients are zero)")
        return self._xi_defined(lambdas).mean(dim=0)


def _bins(sigma: torch.Tensor, half_width: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bin index of every (positive) eigenvalue, and each non-empty bin's smallest and largest
    member; bins are log-spaced with ratio (1 + h) / (1 - h)."""
    ratio = (1 + half_width) / (1 - half_width)
    raw = torch.floor(torch.log(sigma / sigma.min()) / math.log(ratio)).long()
    _, index = torch.unique(raw, return_inverse=True)
    n_bins = int(index.max()) + 1
    lo = torch.full((n_bins,), math.inf, dtype=torch.float64).scatter_reduce(0, index, sigma, "amin")
    hi = torch.zeros(n_bins, dtype=torch.float64).scatter_reduce(0, index, sigma, "amax")
    return index, lo, hi
