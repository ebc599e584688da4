"""Beyond LDS one factor at a time: a sweep that moves the checkpoint of IFFIM (the
last one is the lambda-path cell, scored along a grid besides the default damping) and the
checkpoint set of TracIn on a setting with flipped labels and removal; each value's mislabel
AUC against dense self-influence at that checkpoint with pair counting, its removal effect
against models retrained by hand; the report's section and figure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attr_problems import Problem, loop_grads
from beyond_checks import brute_auc, quiet, quiet_sweep, retrained_output
from tdatune.evaluate.removal import random_removals
from tdatune.study.beyond_factors import factor_rows, factor_summary
from tdatune.study.report import write_report
from tdatune.study.results import load_results
from tdatune.study.sweep import Workspace

SPEC = {
    "name": "factors", "grid_points": 5, "threshold": 0.5,
    "settings": [{"name": "digits-lr", "label": "noisy", "sizes": [80, 20, 20],
                  "label_noise": 0.1}],
    "groundtruth": {"n_subsets": 4},
    "removal": {"examples": 2, "remove": 6, "lambdas": 2, "random": 2},
    "methods": [{"name": "iffim", "vary": [{"lam": "spectrum"}, {"epoch": [1, 3, -1]}]},
                {"name": "tracin", "vary": [{"checkpoints": [[2], "none"]}]}],
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("factors") / "out"
    spec, _ = quiet_sweep(SPEC, out)
    trained = Workspace(spec, out, "cpu", False, quiet).trained("noisy")
    return out, trained, factor_rows(load_results(out))


def test_each_checkpoint_value_equals_dense_self_influence_and_retraining(swept):
    _, trained, rows = swept
    flipped = torch.tensor(trained.splits.info["flipped"])
    prob = Problem(trained.task, trained.splits.train, trained.splits.test, trained.context, 0.0)
    epochs = [r for r in rows if r["method"] == "iffim" and r["hyperparameter"] == "epoch"]
    assert sorted(r["value"] for r in epochs) == [-1, 1, 3]  # -1: the lambda-path cell
    test = trained.splits.test

    rand = random_removals(80, 6, 2, seed=0)
    baseline = [np.mean([retrained_output(trained, rand[r], j) for r in range(2)]) for j in (0, 1)]
    for row in epochs:
        assert row["lam"] == pytest.approx(1e-3)  # IFFIM's study default
        g = loop_grads(prob, prob.train, "loss", row["value"])
        fisher = g.T @ g / len(g) + row["lam"] * torch.eye(g.shape[1], dtype=g.dtype)
        self_inf = (g * torch.linalg.solve(fisher, g.T).T).sum(1)
        assert row["mislabel_auc"] == pytest.approx(brute_auc(self_inf, flipped), abs=1e-9)
        v = loop_grads(prob, test.subset([0, 1]), "output", row["value"])
        scores = -v @ torch.linalg.solve(fisher, g.T)
        keep = torch.ones(2, 80, dtype=torch.bool)
        keep.scatter_(1, scores.topk(6, dim=1).indices, False)
        each = [baseline[j] - retrained_output(trained, keep[j], j) for j in (0, 1)]
        assert row["removal_effect"] == pytest.approx(np.mean(each), rel=0.02, abs=1e-3)
        assert row["removal_effect_sem"] == pytest.approx(abs(each[0] - each[1]) / 2,
                                                          rel=0.05, abs=2e-3)

    # TracIn at one checkpoint: lr x squared loss-gradient norms there
    one = next(r for r in rows if r["method"] == "tracin" and r["value"] == "[2]")
    g = loop_grads(prob, prob.train, "loss", 2)
    lr = (trained.context.learning_rates or [1.0] * len(trained.context.checkpoints))[2]
    assert one["mislabel_auc"] == pytest.approx(brute_auc(lr * g.square().sum(1), flipped),
                                                abs=1e-9)


def test_the_surrogate_column_is_the_cells_xi_row(swept):
    """Read from the cell files by hand: the removal effect at xi's lambda of each value."""
    out, _, rows = swept
    for row in rows:
        cell = json.loads((out / row["file"]).read_text())
        xi = [r for r in cell["removal"]["rows"] if r["rule"] == "xi@0.5"]
        if row["method"] == "tracin":
            assert not xi and np.isnan(row["removal_effect_xi"])
        else:
            assert row["removal_effect_xi"] == pytest.approx(xi[0]["effect"], abs=0)


def test_summary_hand_worked():
    nan = float("nan")

    def row(value, lds, auc, effect, xi):
        return {"setting": "s", "method": "m", "hyperparameter": "proj_dim", "value": value,
                "lds": lds, "mislabel_auc": auc, "removal_effect": effect,
                "removal_effect_xi": xi}

    rows = [row(8, 0.30, 0.91, 1.0, nan), row(16, 0.50, 0.88, -0.5, nan),
            row(None, 0.20, 0.95, 2.5, nan)]
    (s,) = factor_summary(rows)
    assert s["values"] == 3
    assert s["lds_range"] == pytest.approx(0.30) and s["lds_best_at"] == 16
    assert s["mislabel_auc_range"] == pytest.approx(0.07) and s["mislabel_auc_best_at"] is None
    assert s["removal_effect_range"] == pytest.approx(3.0)
    assert s["removal_effect_best_at"] is None  # the unprojected value
    assert np.isnan(s["removal_effect_xi_range"])  # never measured (no damping)


def test_summary_and_report(swept):
    out, _, rows = swept
    summary = {(s["method"], s["hyperparameter"]): s for s in factor_summary(rows)}
    assert summary[("iffim", "epoch")]["values"] == 3
    report = write_report(out).read_text()
    assert "## Beyond LDS, one factor at a time" in report
    assert "| noisy | iffim | epoch | 3 |" in report
    assert report.count("| noisy | iffim | mislabel AUC |") == 1  # the lambda path alone
    assert (out / "figures" / "beyond_factors_iffim.png").stat().st_size > 1000
    assert (out / "beyond_factors.csv").exists()
