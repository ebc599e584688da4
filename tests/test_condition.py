"""The condition curves against dense kernel algebra written out here (B = (K + lambda I)^-1
by a dense inverse, Cov(1_S) from the hypergeometric probabilities, scipy's correlations)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from attr_problems import fisher_problem
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.evaluate.condition import (
    condition_curves,
    decompose,
    first_crossing,
    peak,
    sign_change,
)


def problem(n=24, p=6, m=3, M=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    G, V, F, path = fisher_problem(n, p, m, g)
    size = n // 2
    masks = torch.zeros(M, n, dtype=torch.bool)
    for i in range(M):
        masks[i, torch.randperm(n, generator=g)[:size]] = True
    # outputs: a linear effect of the subset plus noise, so r is related to s but not equal
    effect = -(G @ torch.linalg.solve(F + 0.05 * torch.eye(p, dtype=torch.float64), V.T))  # [n, m]
    outputs = masks.double() @ effect + 0.3 * torch.randn(M, m, generator=g, dtype=torch.float64)
    return G, V, path, masks, outputs.numpy(), size


def test_curves_match_dense_kernel_algebra():
    G, V, path, masks, outputs, size = problem()
    n, m = G.shape[0], V.shape[0]
    lams = [1e-3, 3e-2, 1.0]
    cur = condition_curves(path, masks, outputs, lams)
    X = masks.double().numpy()
    K = (G @ G.T).numpy() / n
    # Cov(1_S) for uniform subsets of a fixed size: P(i in S) = size/n, P(i, j in S) = size(size-1)/(n(n-1))
    pi, pij = size / n, size * (size - 1) / (n * (n - 1))
    C = np.full((n, n), pij - pi * pi)
    np.fill_diagonal(C, pi - pi * pi)
    for li, lam in enumerate(lams):
        B = np.linalg.inv(K + lam * np.eye(n))
        P = np.eye(n) - np.ones((n, n)) / n
        want = {k: [] for k in ("corr", "xi", "rise", "pop", "sp", "pe", "rise_c", "xi_c", "col")}
        for j in range(m):
            s = (G @ V[j]).numpy()
            f = outputs[:, j]
            b = ((X - X.mean(0)) * (f - f.mean())[:, None]).sum(0) / (len(f) - 1)
            r = -b
            h = len(f) // 2
            halves = []
            for rows in (slice(0, h), slice(h, None)):
                x, y = X[rows], f[rows]
                halves.append(-((x - x.mean(0)) * (y - y.mean())[:, None]).sum(0) / (len(y) - 1))
            rbr = halves[0] @ B @ halves[1]
            want["corr"].append(s @ B @ r / math.sqrt((s @ B @ s) * rbr) if rbr > 0 else np.nan)
            want["xi"].append(s @ B @ B @ s / math.sqrt((s @ B @ s) * (s @ B @ B @ B @ s)))
            star = (s @ B @ r) * (s @ B @ B @ B @ s) - (s @ B @ B @ r) * (s @ B @ B @ s)
            want["rise"].append(float(star > 0))
            bpb, bpb2 = s @ B @ P @ B @ s, s @ B @ P @ B @ B @ s
            want["rise_c"].append(float((s @ B @ r) * bpb2 - (s @ B @ B @ r) * bpb > 0))
            want["xi_c"].append(math.sqrt(s @ B @ B @ B @ s) * bpb / (math.sqrt(s @ B @ s) * bpb2))
            tau = -B @ s
            want["pop"].append(tau @ b / math.sqrt((tau @ C @ tau) * f.var(ddof=1)))
            want["col"].append(tau @ b / math.sqrt(C[0, 0] * n / (n - 1) * (tau @ tau)
                                                   * f.var(ddof=1)))
            pred = X @ tau
            want["sp"].append(spearmanr(pred, f).statistic)
            want["pe"].append(pearsonr(pred, f).statistic)
        assert cur.corr_b[li] == pytest.approx(np.nanmean(want["corr"]), abs=1e-9)
        assert cur.xi[li] == pytest.approx(np.mean(want["xi"]), abs=1e-9)
        assert cur.rises[li] == pytest.approx(np.mean(want["rise"]))
        assert cur.rises_centered[li] == pytest.approx(np.mean(want["rise_c"]))
        assert cur.xi_centered[li] == pytest.approx(np.mean(want["xi_c"]), abs=1e-9)
        assert cur.population[li] == pytest.approx(np.mean(want["pop"]), abs=1e-9)
        assert cur.collapsed[li] == pytest.approx(np.mean(want["col"]), abs=1e-9)
        assert cur.spearman[li] == pytest.approx(np.mean(want["sp"]), abs=1e-12)
        assert cur.pearson[li] == pytest.approx(np.mean(want["pe"]), abs=1e-12)


def test_the_sign_of_the_condition_is_the_sign_of_the_population_lds_slope():
    """(*) > 0 exactly where the population Pearson LDS rises (sum_i g_i = 0 is not needed for
    this check: the finite difference is taken on the same centred formula)."""
    G, V, path, masks, outputs, _ = problem(seed=3, m=1)
    G = G - G.mean(0)  # a stationary point: the gradients sum to zero, so Var collapses
    F = G.T @ G / G.shape[0]
    sigma, U = torch.linalg.eigh(F)
    path = LambdaPath(sigma, V @ U, G @ U)
    lams = np.logspace(-4, 1, 30)
    cur = condition_curves(path, masks, outputs, lams)
    slope = np.diff(cur.population)
    mid = cur.rises[:-1] * cur.rises[1:] + (1 - cur.rises[:-1]) * (1 - cur.rises[1:])
    agree = (slope > 0) == (cur.rises[:-1] > 0.5)
    assert agree[mid > 0.5].all()  # where (*) keeps its sign over the step


def test_the_centred_condition_is_the_sign_of_the_population_lds_slope_anywhere():
    """Away from a stationary point (sum_i g_i != 0) the centred (*) still gives the sign of the
    population LDS slope: the finite difference of the exact population Pearson."""
    for seed in (1, 2, 3):
        G, V, _, masks, outputs, _ = problem(seed=seed, m=1)
        shift = torch.randn(G.shape[1], generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64)
        G = G + shift  # every gradient shares a component: sum_i g_i is far from 0
        sigma, U = torch.linalg.eigh(G.T @ G / G.shape[0])
        path = LambdaPath(sigma, V @ U, G @ U)
        cur = condition_curves(path, masks, outputs, np.logspace(-4, 2, 60))
        slope = np.diff(cur.population)
        steady = cur.rises_centered[:-1] == cur.rises_centered[1:]
        assert steady.sum() > 40
        assert ((slope > 0) == (cur.rises_centered[:-1] > 0.5))[steady].all()
        # the uncentred (*), which assumes sum_i g_i = 0, gets the sign wrong somewhere here
        steady_u = cur.rises[:-1] == cur.rises[1:]
        assert not ((slope > 0) == (cur.rises[:-1] > 0.5))[steady_u].all()


def test_a_path_that_is_not_a_fisher_eigenbasis_is_refused():
    _G, _V, path, masks, outputs, _ = problem()
    bad = LambdaPath(path.sigma, path.explained_coords, path.train_coords @ torch.tensor(
        np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))[0]) + 0.5)
    with pytest.raises(ValueError, match="not orthogonal"):
        condition_curves(bad, masks, outputs, [1.0])


def test_first_crossing_by_hand():
    lam = np.array([1.0, 10.0, 100.0])
    assert first_crossing(lam, np.array([0.1, 0.3, 0.9]), 0.5) == pytest.approx(10 ** (1 + 1 / 3))
    assert first_crossing(lam, np.array([0.6, 0.3, 0.9]), 0.5) == 1.0
    assert math.isnan(first_crossing(lam, np.array([0.1, 0.2, 0.3]), 0.5))
    assert first_crossing(lam, np.array([0.1, 0.2, 0.3]), np.array([0.0, 0.5, 0.5])) == 1.0


def test_the_decomposition_telescopes_to_the_total_error():
    _G, _V, path, masks, outputs, _ = problem(seed=5)
    cur = condition_curves(path, masks, outputs, np.logspace(-4, 1, 25))
    parts = decompose(cur, selected=2e-3)
    assert parts["total"] == pytest.approx(math.log10(2e-3 / parts["lambda_best_spearman"]))
    assert sum(parts[k] for k in ("condition", "collapse", "sampling", "spearman")) \
        == pytest.approx(parts["total"])
    if not math.isnan(parts["threshold"]):
        assert parts["threshold"] + parts["cauchy_schwarz"] == pytest.approx(parts["condition"])
    x = np.log(cur.lambdas)
    assert parts["oracle_threshold"] == pytest.approx(
        np.interp(math.log(parts["lambda_best_spearman"]), x, cur.xi))


def test_peak_and_sign_change_by_hand():
    lam = np.array([1e-2, 1e-1, 1.0, 10.0])
    # a parabola in log10 lambda peaking at log10 = -0.7: values -(x + 0.7)^2 at x = -2..1
    y = -((np.log10(lam) + 0.7) ** 2)
    assert peak(lam, y) == pytest.approx(10 ** -0.7)
    assert peak(lam, np.array([3.0, 2.0, 1.0, 0.0])) == 1e-2  # at the end: the grid point
    assert sign_change(lam, np.array([0.9, 0.6, 0.2, 0.1])) == pytest.approx(10 ** -0.75)
    assert sign_change(lam, np.array([0.4, 0.7, 0.3, 0.1])) == 1e-2
    assert sign_change(lam, np.array([0.9, 0.8, 0.7, 0.6])) == 10.0


def test_a_path_of_the_other_sign_is_refused():
    _, _, path, masks, outputs, _ = problem()
    flipped = LambdaPath(path.sigma, path.explained_coords, path.train_coords, sign=1.0)
    with pytest.raises(ValueError, match="sign -1"):
        condition_curves(flipped, masks, outputs, [1.0])
