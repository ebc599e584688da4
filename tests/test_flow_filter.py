"""The gradient-flow spectral filter h(sigma) = (1 - exp(-sigma / lambda)) / sigma against two
independent computations: the matrix exponential of the dense Fisher (scipy) and plain
gradient descent on the quadratic model run for a time T = 1 / lambda from zero."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from tdatune.attributors.lambda_path import LambdaPath, damped_inverse
from tdatune.curvature.eigen import fisher_eigensystem


def _problem(seed: int = 0, n: int = 40, p: int = 9, m: int = 3):
    rng = np.random.default_rng(seed)
    scales = np.array([3.0, 1.7, 1.0, 0.4, 0.2, 0.05, 0.01, 0.003, 0.0])  # a dead last column
    g = rng.standard_normal((n, p)) * scales[:p]
    v = rng.standard_normal((m, p))
    return g, v


def _path(g: np.ndarray, v: np.ndarray) -> LambdaPath:
    eigen = fisher_eigensystem(torch.from_numpy(g))
    return LambdaPath(eigen.sigma, eigen.coords(torch.from_numpy(v)), eigen.train_coords)


@pytest.mark.parametrize("fraction", [0.3, 1e-2, 1e-4])
def test_flow_scores_equal_the_matrix_exponential(fraction):
    """-v F^+ (I - exp(-F / lambda)) g_i with scipy's expm of the dense F = G^T G / n."""
    g, v = _problem()
    f = g.T @ g / len(g)
    lam = fraction * float(np.linalg.eigvalsh(f).max())
    flow = np.linalg.pinv(f, rcond=1e-12) @ (np.eye(len(f)) - scipy.linalg.expm(-f / lam))
    want = -v @ flow @ g.T
    got = _path(g, v).scores(lam, filter="flow").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())


def test_flow_scores_equal_gradient_descent_run_for_time_one_over_lambda():
    """Gradient descent on 0.5 x^T F x - g^T x from x = 0 with a small step for a time T = 1 /
    lambda reaches x(T) = F^+ (I - exp(-F T)) g; the path's flow scores are -v . x(T)."""
    g, v = _problem(seed=1)
    f = g.T @ g / len(g)
    top = float(np.linalg.eigvalsh(f).max())
    lam = 0.05 * top
    step = 1e-3 / top
    x = np.zeros((len(f), len(g)))
    for _ in range(round(1.0 / lam / step)):  # T / step steps (20,000)
        x -= step * (f @ x - g.T)
    want = -v @ x
    got = _path(g, v).scores(lam, filter="flow").numpy()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6 * np.abs(want).max())


def test_the_flow_filter_by_hand_and_its_limits():
    """h at hand-worked points: sigma = lambda gives (1 - 1/e) / lambda (damping gives 1/2 of
    that scale); sigma >> lambda gives 1 / sigma; sigma -> 0 gives 1 / lambda; the null space
    (|sigma| <= 1e-10 x top) gives 0; a negative eigenvalue is refused."""
    sigma = torch.tensor([2.0, 4.0, 1e-12, 0.0, 1e-3], dtype=torch.float64)
    h = damped_inverse(sigma, 2.0, "flow")
    assert float(h[0]) == pytest.approx((1 - np.exp(-1)) / 2, rel=1e-12)
    assert float(h[1]) == pytest.approx((1 - np.exp(-2)) / 4, rel=1e-12)
    assert float(h[2]) == 0.0 and float(h[3]) == 0.0  # below 1e-10 x 4: the null space
    assert float(h[4]) == pytest.approx((1 - np.exp(-5e-4)) / 1e-3, rel=1e-12)
    assert float(damped_inverse(torch.tensor([1e6, 1.0], dtype=torch.float64), 1e-3, "flow")[0]) \
        == pytest.approx(1e-6, rel=1e-12)
    assert float(damped_inverse(sigma, 2.0)[0]) == pytest.approx(0.25)
    path = LambdaPath(torch.tensor([1.0, -0.5], dtype=torch.float64), torch.ones(1, 2,
                      dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="flow filter needs a PSD curvature"):
        path.scores(1.0, filter="flow")
    with pytest.raises(ValueError, match="unknown spectral filter"):
        path.scores(1.0, filter="source")


def test_flow_subset_predictions_sum_the_flow_scores():
    g, v = _problem(seed=2)
    path = _path(g, v)
    masks = torch.from_numpy(np.random.default_rng(3).random((5, len(g))) < 0.5)
    lams = [1e-3, 0.1]
    preds = path.subset_predictions(masks, lams, filter="flow")
    for i, lam in enumerate(lams):
        want = path.scores(lam, filter="flow") @ masks.double().T
        torch.testing.assert_close(preds[i], want)


def test_a_cells_flow_lds_is_the_spearman_of_the_dense_flow_predictions(tmp_path):
    """``diagnosis.flow_lds`` against scipy's Spearman of the dense (expm) flow scores summed
    over each subset, per explained example, averaged."""
    from scipy.stats import spearmanr

    from tdatune.evaluate.groundtruth import GroundTruth, GroundTruthConfig
    from tdatune.study.diagnosis import flow_lds

    g, v = _problem(seed=4, n=30, m=4)
    rng = np.random.default_rng(5)
    masks = rng.random((12, len(g))) < 0.5
    outputs = rng.standard_normal((12, 2, len(v)))  # [M, seeds, m]
    gt = GroundTruth(torch.from_numpy(masks), outputs, GroundTruthConfig(n_subsets=12), tmp_path)
    f = g.T @ g / len(g)
    top = float(np.linalg.eigvalsh(f).max())
    grid = torch.tensor([1e-3 * top, 0.05 * top, 2.0 * top], dtype=torch.float64)
    got = flow_lds(_path(g, v), gt, grid)
    for lam, lds in zip(grid.tolist(), got["lds"], strict=True):
        flow = np.linalg.pinv(f, rcond=1e-12) @ (np.eye(len(f)) - scipy.linalg.expm(-f / lam))
        preds = (-v @ flow @ g.T) @ masks.T  # [m, M]
        want = np.mean([spearmanr(preds[j], outputs.mean(axis=1)[:, j])[0] for j in range(len(v))])
        assert lds == pytest.approx(want, abs=1e-9)
