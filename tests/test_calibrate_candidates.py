"""Choosing among candidate dampings with a few retrained models, by paired differences:
hand-worked per-example LDS, and the whole path against a brute-force Spearman."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from tdatune.attributors.lambda_path import LambdaPath
from tdatune.evaluate.calibrate import calibrate_candidates, candidate_draws, paired_choice


def test_a_clear_paired_lead_replaces_the_default():
    """a leads the default by 0.1, 0.1, 0.1, 0.12 on the four examples: margin 0.105, standard
    error 0.01 / 2 = 0.005, so it settles it; b has the best single example but a lower mean."""
    lds = np.array([[0.5, 0.4, 0.6, 0.5],      # default
                    [0.6, 0.5, 0.7, 0.62],     # a
                    [0.9, 0.0, 0.9, 0.5]])     # b, mean 0.575 < a's 0.605
    choice = paired_choice(lds, ["default", "a", "b"], "default")
    assert choice.chosen == "a" and choice.sure
    assert choice.margin == pytest.approx(0.105)
    assert choice.sem == pytest.approx(0.005)
    assert choice.lds == pytest.approx({"default": 0.5, "a": 0.605, "b": 0.575})


def test_a_noisy_lead_keeps_the_default():
    """a's mean is higher (0.55 against 0.5) but its differences 0.4, -0.3, 0.3, -0.2 have a
    standard error of 0.1756 > 0.05 / 2: not settled, the default stays."""
    lds = np.array([[0.5, 0.4, 0.6, 0.5], [0.9, 0.1, 0.9, 0.3]])
    choice = paired_choice(lds, ["default", "a"], "default")
    assert choice.chosen == "default" and not choice.sure
    assert choice.margin == pytest.approx(0.05)
    assert choice.sem == pytest.approx(np.sqrt(0.37 / 3) / 2)
    assert "does not settle it" in choice.line()
    loose = paired_choice(lds, ["default", "a"], "default", z=0.2)  # 0.05 > 0.2 x 0.1756
    assert loose.chosen == "a" and loose.sure


def _path(seed: int = 0, n: int = 20, k: int = 5, m: int = 3) -> tuple[LambdaPath, np.ndarray]:
    rng = np.random.default_rng(seed)
    sigma = np.array([4.0, 1.0, 0.3, 0.05, 0.002])[:k]
    c = rng.standard_normal((m, k))
    a = rng.standard_normal((n, k))
    return LambdaPath(torch.tensor(sigma), torch.tensor(c), torch.tensor(a)), (sigma, c, a)


def test_calibrate_candidates_against_brute_force_spearman():
    path, (sigma, c, a) = _path()
    rng = np.random.default_rng(1)
    masks = rng.random((6, 20)) < 0.5
    outputs = rng.standard_normal((6, 3))
    cands = {"default": 1.0, "small": 1e-3, "mid": 0.05}
    got = calibrate_candidates(path, torch.from_numpy(masks), outputs, cands, "default")
    for name, lam in cands.items():
        scores = -(c / (sigma + lam)) @ a.T          # [m, n]
        preds = scores @ masks.T                      # [m, K]
        want = np.mean([spearmanr(preds[j], outputs[:, j])[0] for j in range(3)])
        assert got.lds[name] == pytest.approx(want, abs=1e-12)


def test_candidate_draws_gaps_are_measured_on_unseen_subsets():
    """With two candidates where 'good' predicts the outputs exactly and 'bad' reverses them,
    every draw chooses 'good' surely and its gap on the unseen subsets is 0; keeping the bad
    default would cost 2 (Spearman 1 against -1)."""
    rng = np.random.default_rng(2)
    outputs = rng.standard_normal((12, 4))               # [M, m]
    good = outputs.T[None]                               # [1, m, M]
    preds = np.concatenate([-good, good])                # bad (default), good
    gaps = candidate_draws(preds, outputs, 5, ["bad", "good"], "bad", draws=7)
    assert gaps["paired"] == pytest.approx([0.0] * 7)
    assert gaps["default"] == pytest.approx([2.0] * 7)
    assert gaps["sure"] == [1.0] * 7


def test_the_candidates_are_the_rules_dampings_each_once():
    """Eigenvalues 1..10 in one block: the default (here the 0.9 quantile, 9.1) is not repeated
    as q0.9; xi's lambda is the selection's xi_lambda; q0.5 is 5.5; almost none 1e-6 x 10."""
    from dataclasses import replace

    from tdatune.select.surrogate import select_lambda
    from tdatune.study.diagnosis import candidate_dampings

    sigma = torch.arange(1, 11, dtype=torch.float64)
    path = LambdaPath(sigma, torch.ones(2, 10, dtype=torch.float64),
                      torch.ones(4, 10, dtype=torch.float64))
    selection = replace(select_lambda(sigma, path.explained_coords), lam=9.1, xi_lambda=0.37)
    cands = candidate_dampings(path, 9.1, selection)
    assert list(cands) == ["default", "xi", "q0.5", "tiny"]
    assert cands["xi"] == 0.37 and cands["q0.5"] == pytest.approx(5.5)
    assert cands["tiny"] == pytest.approx(1e-5)


def test_candidate_draws_also_judge_other_z_and_the_best_candidate():
    """'a' leads the default by a noisy margin on the seen subsets: z = 0 always switches
    (the best mean wins), z = 2 keeps the default; candidates_best is the unseen gap of the
    better of the two, never above either choice's."""
    rng = np.random.default_rng(7)
    outputs = rng.standard_normal((14, 6))
    good = outputs.T[None]
    noisy = good + rng.standard_normal(good.shape) * 3.0
    preds = np.concatenate([noisy, good + rng.standard_normal(good.shape) * 2.5])
    gaps = candidate_draws(preds, outputs, 5, ["default", "a"], "default", draws=20, seed=3)
    assert len(gaps["paired_z0"]) == len(gaps["paired_z1"]) == 20
    for i in range(20):
        assert gaps["candidates_best"][i] <= min(gaps["paired"][i], gaps["paired_z0"][i]) + 1e-12
        assert gaps["candidates_best"][i] <= gaps["default"][i] + 1e-12
    assert sum(gaps["sure"]) < 20  # z = 2 does not always switch
