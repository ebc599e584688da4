"""Per-block damping of a cell's diagnosis against dense solves and scipy's Spearman."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from tdatune.attributors.lambda_path import EnsembleLambdaPath, LambdaPath
from tdatune.study.diagnosis import _blockwise, spectrum_stats


def test_kronfluence_heuristic_per_block_against_dense_solves():
    g = torch.Generator().manual_seed(3)
    n, m, M = 30, 4, 12
    blocks, test_paths, val_paths = [], [], []
    for p, scale in ((5, 1.0), (4, 1e-2)):
        G = torch.randn(n, p, generator=g, dtype=torch.float64) * scale
        V = torch.randn(m, p, generator=g, dtype=torch.float64) * scale
        Vv = torch.randn(6, p, generator=g, dtype=torch.float64) * scale
        F = G.T @ G / n
        sigma, U = torch.linalg.eigh(F)
        blocks.append((G, V, F, sigma))
        test_paths.append(LambdaPath(sigma, V @ U, G @ U))
        val_paths.append(LambdaPath(sigma, Vv @ U, G @ U))
    masks = torch.rand(M, n, generator=g) < 0.5
    outputs = torch.randn(M, m, generator=g, dtype=torch.float64).numpy()
    gt = SimpleNamespace(masks=masks, mean_outputs=outputs)
    out = _blockwise(EnsembleLambdaPath(test_paths, [1.0, 1.0]),
                     EnsembleLambdaPath(val_paths, [1.0, 1.0]), gt, threshold=0.5)
    lams = [0.1 * float(sigma.mean()) for *_, sigma in blocks]
    assert out["blocks"] == 2
    np.testing.assert_allclose(out["heuristic"]["lambdas"], lams, rtol=1e-12)
    preds = sum(-(V @ torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=torch.float64),
                                         G.T)) @ masks.double().T
                for (G, V, F, _), lam in zip(blocks, lams, strict=True)).numpy()
    want = np.mean([spearmanr(preds[j], outputs[:, j]).statistic for j in range(m)])
    assert out["heuristic"]["lds"] == pytest.approx(want, abs=1e-12)


def test_spectrum_stats_by_hand():
    sigma = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    stats = spectrum_stats(sigma)
    assert stats["top"] == 4.0 and stats["mean"] == pytest.approx(2.0)
    assert stats["mean_nonzero"] == pytest.approx(2.5)
    assert stats["quantiles"]["0.5"] == pytest.approx(2.5)  # the median of 1, 2, 3, 4
