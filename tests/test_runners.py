"""Ground-truth runners: every backend gives the sequential backend's outputs, and resumes."""

from __future__ import annotations

import json
import operator
from functools import partial

import numpy as np
import pytest

from tdatune.evaluate.groundtruth import (
    GroundTruthConfig,
    RetrainJob,
    build_ground_truth,
    sample_subsets,
)
from tdatune.evaluate.runners import chunked, make_runner, map_local, map_ray, resolve_backend
from tdatune.models.small import MLP, LogisticRegression
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SGD = TrainRecipe(optimizer="sgd", epochs=2, lr=0.05, batch_size=32, momentum=0.9,
                  weight_decay=1e-3)
LBFGS = TrainRecipe(optimizer="lbfgs", epochs=2, lbfgs_iters=60, weight_decay=1e-2)
CONFIG = GroundTruthConfig(n_subsets=4, alpha=0.5, seeds_per_subset=2, subset_seed=3)


def _mlp(splits) -> Task:
    return Task(make_model=partial(MLP, 64, (16,), splits.num_classes), name="mlp")


def _lr(splits) -> Task:
    return Task(make_model=partial(LogisticRegression, 64, splits.num_classes), name="lr")


@pytest.fixture(scope="module")
def sequential_mlp(digits_small, tmp_path_factory):
    """The reference: the MLP ground truth retrained one model at a time."""
    gt = build_ground_truth(_mlp(digits_small), SGD, digits_small.train, digits_small.test,
                            CONFIG, tmp_path_factory.mktemp("seq"), backend="sequential",
                            show_progress=False)
    return gt.outputs


def test_batched_backend_equals_sequential(digits_small, sequential_mlp, tmp_path):
    gt = build_ground_truth(_mlp(digits_small), SGD, digits_small.train, digits_small.test,
                            CONFIG, tmp_path, backend="batched",
                            backend_options={"chunk_size": 3}, show_progress=False)
    np.testing.assert_allclose(gt.outputs, sequential_mlp, atol=1e-4)
    assert json.loads((tmp_path / "backend.json").read_text())["backend"] == "batched"


def test_batched_lbfgs_ground_truth_close_to_sequential(digits_small, tmp_path):
    task = _lr(digits_small)
    config = GroundTruthConfig(n_subsets=3, alpha=0.5, subset_seed=1)
    seq = build_ground_truth(task, LBFGS, digits_small.train, digits_small.test, config,
                             tmp_path / "seq", backend="sequential", show_progress=False)
    batched = build_ground_truth(task, LBFGS, digits_small.train, digits_small.test, config,
                                 tmp_path / "batched", backend="batched", show_progress=False)
    # Both reach the unique minimiser to float32 precision; margins agree closely.
    np.testing.assert_allclose(batched.outputs, seq.outputs, atol=5e-3)
    # auto keeps L-BFGS recipes sequential: batched is not train_model's exact iterate.
    assert resolve_backend("auto", task, LBFGS) == "sequential"
    assert resolve_backend("auto", task, SGD) == "batched"


def test_process_backend_equals_sequential(digits_small, sequential_mlp, tmp_path):
    gt = build_ground_truth(_mlp(digits_small), SGD, digits_small.train, digits_small.test,
                            CONFIG, tmp_path, backend="process",
                            backend_options={"num_workers": 2, "threads_per_worker": 1},
                            show_progress=False)
    np.testing.assert_allclose(gt.outputs, sequential_mlp, atol=1e-5)


def test_ray_backend_equals_sequential(digits_small, sequential_mlp, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        gt = build_ground_truth(_mlp(digits_small), SGD, digits_small.train, digits_small.test,
                                CONFIG, tmp_path / "per-model", backend="ray",
                                show_progress=False)
        np.testing.assert_allclose(gt.outputs, sequential_mlp, atol=1e-5)
        chunks = build_ground_truth(_mlp(digits_small), SGD, digits_small.train,
                                    digits_small.test, CONFIG, tmp_path / "chunks", backend="ray",
                                    backend_options={"models_per_task": 4}, show_progress=False)
        np.testing.assert_allclose(chunks.outputs, sequential_mlp, atol=1e-4)
        seen: dict[int, int] = {}
        assert map_ray(partial(operator.mul, 3), range(5),
                       on_result=seen.__setitem__) == [0, 3, 6, 9, 12]
        assert seen == {i: 3 * i for i in range(5)}
        assert ray.is_initialized()  # the runner leaves an instance it did not start running
    finally:
        ray.shutdown()


def test_interrupted_run_resumes_with_another_backend(digits_small, sequential_mlp, tmp_path):
    task = _mlp(digits_small)
    batched = make_runner("batched", task, SGD, digits_small.train, digits_small.test,
                          _masks(digits_small), show_progress=False,
                          chunk_size=2)
    calls: list[RetrainJob] = []

    def dies_after_four(jobs, done):
        def counting(job, out):
            calls.append(job)
            done(job, out)
            if len(calls) == 4:
                raise KeyboardInterrupt
        batched(jobs, counting)

    with pytest.raises(KeyboardInterrupt):
        build_ground_truth(task, SGD, digits_small.train, digits_small.test, CONFIG, tmp_path,
                           runner=dies_after_four, show_progress=False)
    assert len(list((tmp_path / "models").glob("*.npy"))) == 4
    assert not (tmp_path / "outputs.npy").exists()
    resumed: list[RetrainJob] = []
    sequential = make_runner("sequential", task, SGD, digits_small.train, digits_small.test,
                             _masks(digits_small), show_progress=False)

    def recording(jobs, done):
        resumed.extend(jobs)
        sequential(jobs, done)

    gt = build_ground_truth(task, SGD, digits_small.train, digits_small.test, CONFIG, tmp_path,
                            runner=recording, show_progress=False)
    assert {(j.subset, j.replicate) for j in resumed}.isdisjoint(
        {(j.subset, j.replicate) for j in calls})
    assert len(resumed) == CONFIG.n_subsets * CONFIG.seeds_per_subset - 4
    np.testing.assert_allclose(gt.outputs, sequential_mlp, atol=1e-4)


def _masks(splits):
    return sample_subsets(len(splits.train), CONFIG)


def test_make_runner_refuses_bad_input(digits_small):
    task = _mlp(digits_small)
    args = (task, SGD, digits_small.train, digits_small.test, None)
    with pytest.raises(ValueError, match="choose one of"):
        make_runner("threads", *args)
    with pytest.raises(TypeError, match="batched backend"):
        make_runner("batched", *args, num_workers=3)
    with pytest.raises(TypeError, match="sequential backend takes no options"):
        make_runner("sequential", *args, chunk_size=2)
    assert resolve_backend("auto", task) == "batched"


def test_map_local_keeps_order():
    seen: dict[int, int] = {}
    assert map_local(partial(operator.add, 10), [3, 1, 2], num_workers=2,
                     on_result=seen.__setitem__) == [13, 11, 12]
    assert seen == {0: 13, 1: 11, 2: 12}
    assert map_local(abs, [-1, 2], num_workers=0) == [1, 2]
    assert chunked(list(range(5)), 2) == [[0, 1], [2, 3], [4]]


def test_a_failed_task_is_raised_and_the_queued_ones_cancelled():
    """The drain loop every pool backend uses: the first failure propagates, and futures not
    yet started are cancelled rather than left to run."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tdatune.evaluate.runners import _drain_futures

    release = threading.Event()

    def fails() -> int:
        raise RuntimeError("task 0 failed")

    def waits(i: int) -> int:
        release.wait(10)
        return i

    seen: list[int] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = {pool.submit(fails): 0}
        futures.update({pool.submit(waits, i): i for i in range(1, 4)})
        try:
            with pytest.raises(RuntimeError, match="task 0 failed"):
                _drain_futures(futures, lambda key, result: seen.append(key))
        finally:
            release.set()
    assert seen == []
    cancelled = sorted(i for f, i in futures.items() if f.cancelled())
    # Task 1 may have started on the single worker before the cancel (then it ran to the end);
    # tasks 2 and 3 were queued behind it, so they cannot have started.
    assert cancelled in ([2, 3], [1, 2, 3])
