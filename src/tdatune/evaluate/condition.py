"""The selection's condition measured against ground truth: where does xi go wrong?

``docs/surrogate.md`` derives, for the population-Pearson LDS, that LDS rises with lambda
exactly when

    (*)  (s^T B r)(s^T B^3 s) - (s^T B^2 r)(s^T B^2 s) > 0,      B = (K + lambda I)^-1,

and, by Cauchy-Schwarz, whenever corr_B(s, r) > xi(lambda). Algorithm 1 then replaces the
unknown corr_B(s, r) by a constant threshold. A ground truth holds r = -Cov_S(1_S, f(theta_S)),
so every link of that chain can be measured per explained example along a lambda grid:

- the Spearman LDS (what tdatune reports), the sample Pearson LDS over the same subsets, and
  the population Pearson LDS of the derivation (tau^T b / sqrt(Var tau^T 1_S Var f));
- the sign of (*), corr_B(s, r) and xi (on the explained examples' own gradients).

In the path's coordinates (``LambdaPath``: eigenvalues sigma, explained coordinates c and
training coordinates a whose columns are orthogonal for a Fisher path) the training-side
unit vectors are e_k = a_k / ||a_k||, so with nu_k = ||a_k||^2 and rho_k = e_k . r

    s^T B^j r = sum_k sqrt(nu_k) c_k rho_k / (sigma_k + lambda)^j,
    s^T B^j s = sum_k nu_k c_k^2 / (sigma_k + lambda)^j,
    r^T B r   = sum_k rho_k^2 / (sigma_k + lambda) + (||r||^2 - sum_k rho_k^2) / lambda.

r is estimated from M subsets; for M << n its sampling noise dominates ||r||, which would drive
corr_B to zero whatever the truth. The quadratic r^T B r is therefore estimated without that
bias as r1^T B r2, from two disjoint halves of the subsets (the linear terms need no care).

:func:`decompose` turns the curves into the four lambdas whose ratios split the selection's
error in decades: the threshold (xi crosses the measured corr_B elsewhere than at the
threshold), the Cauchy-Schwarz slack (xi = corr_B is only sufficient for (*)), the
population-Pearson approximation (the zero of (*) against the sample Pearson optimum) and
Pearson against Spearman.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tdatune.attributors.lambda_path import LambdaPath
from tdatune.select.centered import centered_indicator
from tdatune.utils.checks import check_shape
from tdatune.utils.correlation import pearson_rows, spearman_rows

ORTHOGONALITY_RTOL = 1e-6


@dataclass
class ConditionCurves:
    """Means over explained examples of every link of the chain, per lambda of ``lambdas``."""

    lambdas: np.ndarray         # [L]
    spearman: np.ndarray        # [L] Spearman LDS
    pearson: np.ndarray         # [L] sample Pearson LDS over the same subsets
    population: np.ndarray      # [L] population Pearson LDS (the derivation's)
    collapsed: np.ndarray       # [L] the same with ||tau||^2 for Var(tau^T 1_S): (*) is its slope
    rises: np.ndarray           # [L] fraction of examples with (*) > 0
    rises_centered: np.ndarray  # [L] the same for (*) keeping P = I - 1 1^T / n (no collapse)
    xi_centered: np.ndarray     # [L] xi_c on the explained examples' own gradients
    corr_b: np.ndarray          # [L] corr_B(s, r), r^T B r split-half (mean where defined)
    corr_b_defined: np.ndarray  # [L] fraction of examples whose split-half r^T B r is > 0
    xi: np.ndarray              # [L] xi on the explained examples' own gradients

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-friendly curves."""
        return {k: [float(x) for x in getattr(self, k)] for k in
                ("lambdas", "spearman", "pearson", "population", "collapsed", "rises",
                 "rises_centered",
                 "corr_b", "corr_b_defined", "xi", "xi_centered")}


def retraining_signal(masks: torch.Tensor, outputs: np.ndarray) -> np.ndarray:
    """b = Cov_S(1_S, f(theta_S)) per explained example, from the ground truth: [m, n]."""
    x = masks.double().numpy()
    f = np.asarray(outputs, dtype=np.float64)
    check_shape("ground-truth outputs", torch.as_tensor(f), [x.shape[0], None])
    xc = x - x.mean(axis=0, keepdims=True)
    fc = f - f.mean(axis=0, keepdims=True)
    return fc.T @ xc / (x.shape[0] - 1)


def _orthogonal_columns(a: torch.Tensor) -> bool:
    """Whether the training coordinates' columns are orthogonal (a Fisher eigenbasis)."""
    k = a.shape[1]
    idx = torch.linspace(0, k - 1, steps=min(k, 64)).round().long().unique()
    gram = a[:, idx].T @ a  # [|idx|, k]
    norms = a.pow(2).sum(dim=0).sqrt()
    scale = norms[idx][:, None] * norms[None, :]
    off = gram.clone()
    off[torch.arange(len(idx)), idx] = 0.0
    return bool((off.abs() <= ORTHOGONALITY_RTOL * scale + 1e-300).all())


def condition_curves(path: LambdaPath, masks: torch.Tensor, outputs: np.ndarray,
                     lambdas: torch.Tensor | list[float]) -> ConditionCurves:
    """Every link of the selection's derivation along ``lambdas`` for the explained examples of
    ``path`` against ground truth ``masks`` [M, n] and mean ``outputs`` [M, m].

    Needs a single Fisher-type path (orthogonal training coordinates: IFFIM, LoGra with one
    block); raises otherwise."""
    a = path.train_coords.double()
    c = path.explained_coords.double()
    sigma = path.sigma.double()
    if path.sign != -1.0:
        raise ValueError("the condition is derived for influence scores tau = -B s (a path with "
                         f"sign -1); this path has sign {path.sign:g}")
    if not _orthogonal_columns(a):
        raise ValueError("the path's training coordinates are not orthogonal (not a single "
                         "Fisher eigenbasis: TRAK's Q weighting, an ensemble, a Hessian); the "
                         "condition is derived for B = (G G^T / n + lambda I)^-1")
    lam = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
    f = np.asarray(outputs, dtype=np.float64)
    b = torch.from_numpy(retraining_signal(masks, f))          # [m, n]
    r = -b
    nu = a.pow(2).sum(dim=0)                                    # [k]
    keep = nu > 0
    a, c, sigma, nu = a[:, keep], c[:, keep], sigma[keep], nu[keep]
    e = a / nu.sqrt()
    rho = r @ e                                                 # [m, k]
    # r^T B r from two halves of the subsets, r1^T B r2: the noise of r estimated from M
    # subsets (most of its norm for M << n) cancels in expectation instead of swamping it
    half = masks.shape[0] // 2
    r1 = -torch.from_numpy(retraining_signal(masks[:half], f[:half]))
    r2 = -torch.from_numpy(retraining_signal(masks[half:], f[half:]))
    rho1, rho2 = r1 @ e, r2 @ e
    r_perp = (r1 * r2).sum(dim=1) - (rho1 * rho2).sum(dim=1)    # [m]
    cs = c * nu.sqrt()                                          # s in the e_k basis
    inv = 1.0 / (sigma[:, None] + lam[None, :])                 # [k, L]
    srj = [(cs * rho) @ inv.pow(j) for j in (1, 2)]             # [m, L]
    ssj = [cs.pow(2) @ inv.pow(j) for j in (1, 2, 3)]
    rbr = (rho1 * rho2) @ inv + r_perp[:, None] / lam[None, :]
    star = srj[0] * ssj[2] - srj[1] * ssj[1]
    # keeping P = I - 1 1^T / n in Var(tau^T 1_S): s^T B P B^j s = s^T B^(j+1) s - T_1 T_j / n
    ones = a.sum(dim=0)
    t1, t2 = ((c * ones) @ inv.pow(j) for j in (1, 2))
    n = a.shape[0]
    star_c = srj[0] * (ssj[2] - t1 * t2 / n) - srj[1] * (ssj[1] - t1.pow(2) / n)
    with np.errstate(invalid="ignore", divide="ignore"):
        defined = rbr > 0  # the split-half estimate can be <= 0 when noise swamps the signal
        corr_b = torch.where(defined, srj[0] / (ssj[0] * rbr.clamp_min(1e-300)).sqrt(),
                             torch.full_like(rbr, float("nan"))).numpy()
        xi = (ssj[1] / (ssj[0] * ssj[2]).sqrt()).numpy()
    # LDS variants: predicted subset sums and the population Pearson of the derivation
    preds = path.subset_predictions(masks, lam).numpy()         # [L, m, M]
    spear = spearman_rows(preds, f.T[None])
    pear = pearson_rows(preds, f.T[None])
    tau = torch.stack([path.sign * ((c / (sigma + float(x))) @ a.T) for x in lam])  # [L, m, n]
    tau_c = tau - tau.mean(dim=2, keepdim=True)
    alpha = float(masks.double().mean())
    c0 = alpha * (1 - alpha) * n / (n - 1)  # Var(1_S) = c0 (I - 1 1^T / n), uniform fixed size
    var_f = f.var(axis=0, ddof=1)                               # [m]
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = (tau * b[None]).sum(dim=2).numpy()
        pop = cov / np.sqrt(c0 * tau_c.pow(2).sum(dim=2).numpy() * var_f[None])
        collapsed = cov / np.sqrt(c0 * tau.pow(2).sum(dim=2).numpy() * var_f[None])
    return ConditionCurves(lambdas=lam.numpy(), spearman=np.nanmean(spear, axis=1),
                           pearson=np.nanmean(pear, axis=1), population=np.nanmean(pop, axis=1),
                           collapsed=np.nanmean(collapsed, axis=1),
                           rises=np.nanmean((star > 0).double().numpy(), axis=0),
                           rises_centered=(star_c > 0).double().mean(dim=0).numpy(),
                           xi_centered=_nanmean0(centered_indicator(sigma, c, a, lam).numpy()),
                           corr_b=_nanmean0(corr_b), corr_b_defined=defined.double().mean(0).numpy(),
                           xi=np.nanmean(xi, axis=0))


def _nanmean0(x: np.ndarray) -> np.ndarray:
    """Column means over the finite entries (NaN, without a warning, for an empty column)."""
    ok = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, x, 0.0).sum(axis=0) / ok.sum(axis=0)


def first_crossing(lambdas: np.ndarray, values: np.ndarray, level: np.ndarray | float
                   ) -> float:
    """The smallest lambda (log-linear interpolation) where ``values`` reaches ``level``
    (a constant or a curve on the same grid); NaN when it never does."""
    d = np.asarray(values, dtype=np.float64) - np.broadcast_to(level, np.shape(values))
    above = np.nonzero(d >= 0)[0]
    if above.size == 0:
        return math.nan
    i = int(above[0])
    if i == 0:
        return float(lambdas[0])
    t = d[i - 1] / (d[i - 1] - d[i])
    lo, hi = math.log(lambdas[i - 1]), math.log(lambdas[i])
    return math.exp(lo + t * (hi - lo))


def peak(lambdas: np.ndarray, values: np.ndarray) -> float:
    """The lambda of the curve's maximum, refined by a parabola through the grid maximum and its
    two neighbours in log lambda (the grid maximum itself at an end of the grid)."""
    i = int(np.nanargmax(values))
    if not 0 < i < len(values) - 1 or not np.isfinite(values[i - 1: i + 2]).all():
        return float(lambdas[i])
    x = np.log(np.asarray(lambdas[i - 1: i + 2], dtype=np.float64))
    y = np.asarray(values[i - 1: i + 2], dtype=np.float64)
    a, b, _ = np.polyfit(x, y, 2)
    vertex = -b / (2 * a) if a < 0 else x[1]
    return float(math.exp(min(max(vertex, x[0]), x[2])))


def sign_change(lambdas: np.ndarray, rising: np.ndarray) -> float:
    """Where the fraction of examples whose LDS rises first drops below one half, interpolated
    in log lambda (the grid's first lambda when it starts below, its last when it never
    drops)."""
    below = np.nonzero(rising < 0.5)[0]
    if below.size == 0:
        return float(lambdas[-1])
    i = int(below[0])
    if i == 0:
        return float(lambdas[0])
    t = (rising[i - 1] - 0.5) / (rising[i - 1] - rising[i])
    lo, hi = math.log(lambdas[i - 1]), math.log(lambdas[i])
    return math.exp(lo + t * (hi - lo))


def decompose(curves: ConditionCurves, selected: float) -> dict[str, float]:
    """The selection's error, log10(selected / best Spearman lambda), split into links that
    telescope to it:

    - ``condition``: selected against the zero of (*) (the constant threshold and the
      Cauchy-Schwarz slack together; split into ``threshold`` and ``cauchy_schwarz`` where
      mean xi crosses the measured corr_B);
    - ``collapse``: the zero of (*) against the optimum of the population Pearson LDS (the
      variance collapse sum_i g_i = 0 that (*) assumes);
    - ``sampling``: population against sample Pearson optimum (M subsets, not the population);
    - ``spearman``: sample Pearson against Spearman optimum.

    The zero of (*) is taken as the peak of the mean collapsed population LDS (whose slope
    per example has the sign of (*)). Optima are refined by :func:`peak`. ``oracle_threshold`` is
    the mean xi at the best Spearman lambda: the threshold that would have selected it."""
    lam = curves.lambdas
    at_corr = first_crossing(lam, curves.xi, curves.corr_b)        # xi reaches corr_B
    # (*) is the slope of the collapsed population LDS per example: the zero of the mean slope
    # is that curve's peak (per-example fractions of rising examples are kept as ``rises``)
    star_zero = (peak(lam, curves.collapsed) if np.isfinite(curves.collapsed).any()
                 else sign_change(lam, curves.rises))  # cells stored before ``collapsed``
    star_c_zero = sign_change(lam, curves.rises_centered)
    best_population = peak(lam, curves.population)
    best_pearson = peak(lam, curves.pearson)
    best_spearman = peak(lam, curves.spearman)
    lg = math.log10
    out = {"lambda_xi_at_corr": at_corr, "lambda_star_zero": star_zero,
           "lambda_best_population": best_population, "lambda_best_pearson": best_pearson,
           "lambda_best_spearman": best_spearman,
           "oracle_threshold": float(np.interp(math.log(best_spearman), np.log(lam), curves.xi)),
           "total": lg(selected / best_spearman), "condition": lg(selected / star_zero),
           "collapse": lg(star_zero / best_population),
           "sampling": lg(best_population / best_pearson),
           "spearman": lg(best_pearson / best_spearman),
           "threshold": math.nan, "cauchy_schwarz": math.nan,
           "lambda_star_centered_zero": star_c_zero,
           "centered_vs_population": lg(star_c_zero / best_population)}
    if not math.isnan(at_corr):
        out |= {"threshold": lg(selected / at_corr), "cauchy_schwarz": lg(at_corr / star_zero)}
    return out
