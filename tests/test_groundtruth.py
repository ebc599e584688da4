"""Ground truth: real retraining per subset, resume after a kill, refusal of a stale store."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from tdatune.evaluate.groundtruth import (
    GroundTruthConfig,
    build_ground_truth,
    load_ground_truth,
    retrain_outputs,
    sample_subsets,
)
from tdatune.models.small import LogisticRegression
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe, init_model, train_model

RECIPE = TrainRecipe(optimizer="lbfgs", epochs=1, lbfgs_iters=30, weight_decay=1e-2)


@pytest.fixture
def setup(digits_small):
    task = Task(make_model=partial(LogisticRegression, 64, 10), name="gt-test")
    return task, digits_small.train, digits_small.test


def test_subsets_have_exact_size_and_are_seeded():
    cfg = GroundTruthConfig(n_subsets=7, alpha=0.3, subset_seed=5)
    masks = sample_subsets(40, cfg)
    assert masks.shape == (7, 40) and bool((masks.sum(1) == 12).all())
    assert torch.equal(masks, sample_subsets(40, cfg))
    assert not torch.equal(masks, sample_subsets(40, GroundTruthConfig(n_subsets=7, alpha=0.3)))


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5, 1.5])
def test_subset_fraction_outside_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha"):
        GroundTruthConfig(alpha=alpha)


def test_outputs_equal_brute_force_retraining(setup, tmp_path):
    task, train, test = setup
    cfg = GroundTruthConfig(n_subsets=3, alpha=0.5, seeds_per_subset=2)
    gt = build_ground_truth(task, RECIPE, train, test, cfg, tmp_path / "gt", show_progress=False)
    assert gt.outputs.shape == (3, 2, len(test))
    for m in range(3):
        for s in range(2):
            seed = cfg.model_seed(m, s)
            result = train_model(task, train.subset(gt.masks[m]), RECIPE, seed)
            model = init_model(task, seed)
            model.load_state_dict(result.state)
            with torch.no_grad():
                want = task.output_fn(model(test.inputs), test.targets).double().numpy()
            np.testing.assert_allclose(gt.outputs[m, s], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(load_ground_truth(tmp_path / "gt").outputs, gt.outputs)


def test_resume_after_kill_retrains_only_unfinished_models(setup, tmp_path):
    task, train, test = setup
    cfg = GroundTruthConfig(n_subsets=6, alpha=0.5)
    trained: list[int] = []

    def runner(kill_after: int | None):
        def run(jobs, done):
            for k, job in enumerate(jobs):
                if kill_after is not None and k == kill_after:
                    raise KeyboardInterrupt("simulated kill")
                trained.append(job.subset)
                done(job, retrain_outputs(task, RECIPE, train, test, masks[job.subset], job.seed))
        return run

    masks = sample_subsets(len(train), cfg)
    with pytest.raises(KeyboardInterrupt):
        build_ground_truth(task, RECIPE, train, test, cfg, tmp_path, runner=runner(4),
                           show_progress=False)
    assert trained == [0, 1, 2, 3]
    assert not (tmp_path / "outputs.npy").exists()
    trained.clear()
    gt = build_ground_truth(task, RECIPE, train, test, cfg, tmp_path, runner=runner(None),
                            show_progress=False)
    assert trained == [4, 5]
    assert gt.outputs.shape == (6, 1, len(test))
    # The resumed ground truth equals an uninterrupted build, model for model.
    trained.clear()
    whole = build_ground_truth(task, RECIPE, train, test, cfg, tmp_path / "whole",
                               runner=runner(None), show_progress=False)
    assert trained == [0, 1, 2, 3, 4, 5]
    assert torch.equal(gt.masks, whole.masks)
    np.testing.assert_array_equal(gt.outputs, whole.outputs)
    # ... and each model's row is that subset's own retraining (not a neighbour's).
    want = retrain_outputs(task, RECIPE, train, test, masks[5], cfg.model_seed(5, 0))
    np.testing.assert_array_equal(gt.outputs[5, 0], want)
    trained.clear()
    again = build_ground_truth(task, RECIPE, train, test, cfg, tmp_path, runner=runner(None),
                               show_progress=False)
    assert trained == []  # a finished ground truth is reused as stored
    np.testing.assert_array_equal(again.outputs, whole.outputs)


def test_mismatched_configuration_is_refused(setup, tmp_path):
    task, train, test = setup
    build_ground_truth(task, RECIPE, train, test, GroundTruthConfig(n_subsets=2), tmp_path,
                       show_progress=False)
    with pytest.raises(ValueError, match=r"different configuration.*config"):
        build_ground_truth(task, RECIPE, train, test, GroundTruthConfig(n_subsets=3), tmp_path,
                           show_progress=False)
    with pytest.raises(ValueError, match=r"different configuration.*train_fingerprint"):
        build_ground_truth(task, RECIPE, train.subset(torch.arange(100)), test,
                           GroundTruthConfig(n_subsets=2), tmp_path, show_progress=False)
