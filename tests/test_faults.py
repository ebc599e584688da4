"""Fault injection: bad inputs refused with messages that name the culprit, a real ``kill -9``
followed by a resume equal to an uninterrupted run, and every stored artefact truncated or
corrupted, then read back (an error naming the file, or a recomputation that says so)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import tdatune.features.store as store_module
from tdatune.data.base import ArrayDataset, make_splits
from tdatune.evaluate.groundtruth import (
    GroundTruthConfig,
    build_ground_truth,
    load_ground_truth,
    retrain_outputs,
)
from tdatune.evaluate.lds import lds, lds_path
from tdatune.features.gradients import per_example_grads
from tdatune.features.store import FeatureStore, build_gradient_store
from tdatune.models.small import MLP, LogisticRegression
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe, init_model, load_checkpoints, train_model
from tdatune.select.surrogate import select_lambda
from tdatune.utils.atomic import DamagedFileError, atomic_write_json, read_json, record_path
from tdatune.utils.checks import check_class_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LR_RECIPE = TrainRecipe(optimizer="lbfgs", epochs=1, lbfgs_iters=20, weight_decay=1e-2)
SGD_RECIPE = TrainRecipe(optimizer="sgd", epochs=3, lr=0.05, batch_size=16, momentum=0.9,
                         weight_decay=1e-3)
REPO = Path(__file__).resolve().parents[1]


def _lr_task() -> Task:
    return Task(make_model=partial(LogisticRegression, 64, 10), name="faults-lr")


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---------------------------------------------------------------- bad inputs

def _nan_row(n: int = 6, row: int = 3, value: float = float("nan")) -> torch.Tensor:
    x = torch.randn(n, 4)
    x[row, 2] = value
    return x


def _lds_outputs(bad: str) -> np.ndarray:
    out = np.random.default_rng(0).normal(size=(8, 3))
    if bad == "nan":
        out[5, 2] = np.nan
    else:
        out[:, 1] = 0.25
    return out


BAD_INPUTS = [
    ("NaN input", lambda: ArrayDataset(_nan_row(), torch.zeros(6, dtype=torch.long)),
     ValueError, ["inputs", "example 3", "NaN"]),
    ("inf input", lambda: ArrayDataset(_nan_row(value=float("inf")), torch.zeros(6)),
     ValueError, ["inputs", "example 3"]),
    ("NaN float target", lambda: ArrayDataset(torch.zeros(6, 2), _nan_row()[:, 2]),
     ValueError, ["targets", "example 3"]),
    ("empty subset", lambda: ArrayDataset(torch.zeros(4, 2), torch.zeros(4)).subset([]),
     ValueError, ["subset", "empty index"]),
    ("empty mask", lambda: ArrayDataset(torch.zeros(4, 2), torch.zeros(4)).subset(
        torch.zeros(4, dtype=torch.bool)), ValueError, ["subset", "empty"]),
    ("float subset index", lambda: ArrayDataset(torch.zeros(4, 2), torch.zeros(4)).subset(
        torch.tensor([0.0, 1.0])), ValueError, ["integer indices", "long()"]),
    ("label 12 of 10 classes", lambda: check_class_targets(
        "train targets", torch.tensor([1, 2, 12, 3]), 10), ValueError,
     ["label 12", "example 2", "10 classes"]),
    ("negative label", lambda: check_class_targets("train targets", torch.tensor([0, -3]), 10),
     ValueError, ["label -3", "example 1"]),
    ("float labels", lambda: check_class_targets("train targets", torch.tensor([1.0, 2.0]), 10),
     ValueError, ["integer class indices", "float32", "long()"]),
    ("empty train split", lambda: make_splits(
        torch.zeros(10, 2), torch.zeros(10), n_train=0, n_val=2, n_test=2, seed=0, name="d",
        source="s", num_classes=2), ValueError, ["n_train"]),
    ("select_lambda with 0 validation rows", lambda: select_lambda(
        torch.tensor([2.0, 1.0]), torch.zeros(0, 2)), ValueError, ["validation", "0 rows"]),
    ("NaN ground-truth outputs", lambda: lds(
        torch.randn(3, 5), torch.rand(8, 5) < 0.5, _lds_outputs("nan")), ValueError,
     ["NaN", "explained example 2", "subset 5", "invalid='mask'"]),
    ("constant ground-truth outputs", lambda: lds(
        torch.randn(3, 5), torch.rand(8, 5) < 0.5, _lds_outputs("constant")), ValueError,
     ["same value", "explained example 1", "invalid='mask'"]),
    ("NaN scores", lambda: lds(
        torch.tensor([[1.0, float("nan")], [0.0, 1.0]]),
        torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.bool), np.random.default_rng(0).random((3, 2))),
     ValueError, ["explained example 0"]),
    ("unknown NaN policy", lambda: lds(torch.randn(3, 5), torch.rand(8, 5) < 0.5,
                                       _lds_outputs("nan"), invalid="ignore"),
     ValueError, ["ignore", "raise", "mask"]),
    ("one subset", lambda: GroundTruthConfig(n_subsets=1), ValueError, ["n_subsets"]),
    ("wrong feature dimension", lambda: _ground_truth_with(features=65), ValueError,
     ["training data", "[3, 65]", "64x10"]),
    ("label 12 of 10 classes (ground truth)", lambda: _ground_truth_with(label=12), ValueError,
     ["label 12", "example 7", "10 classes"]),
    ("float labels (ground truth)", lambda: _ground_truth_with(float_labels=True), ValueError,
     ["integer class indices", "float32"]),
    ("NaN feature rows", lambda: FeatureStore.open_or_create(
        _fresh_dir(), shape=(6, 4), identity={}, chunk_rows=6).write_chunk(0, _nan_row()),
     ValueError, ["example 3"]),
]


def _ground_truth_with(features: int = 64, label: int | None = None,
                       float_labels: bool = False) -> None:
    """build_ground_truth on bad data; must refuse it before any retraining."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20, features, generator=gen)
    y = torch.arange(20) % 10
    if label is not None:
        y[7] = label
    data = ArrayDataset(x, y.float() if float_labels else y)
    task = Task(make_model=partial(LogisticRegression, 64, 10), name="bad-data")

    def must_not_run(jobs, done):
        raise AssertionError("retraining started on data that should have been refused")

    build_ground_truth(task, LR_RECIPE, data, data, GroundTruthConfig(n_subsets=2),
                       _fresh_dir(), runner=must_not_run, show_progress=False)


def _fresh_dir() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="tdatune-faults-"))


@pytest.mark.parametrize(("label", "call", "error", "names"), BAD_INPUTS,
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_refused_naming_the_culprit(label, call, error, names):
    with pytest.raises(error) as info:
        call()
    for name in names:
        assert name in str(info.value), f"{label}: {name!r} not in {info.value}"


def test_lds_masks_invalid_outputs_by_option_and_counts_them():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 5, generator=gen)
    masks = torch.rand(8, 5, generator=gen) < 0.5
    outputs = _lds_outputs("nan")
    outputs[:, 0] = 1.0  # constant as well
    result = lds(scores, masks, outputs, invalid="mask")
    assert result.n_masked == 2 and result.n_valid == 1 and result.to_dict()["n_masked"] == 2
    # Example 1 alone, by an independent Spearman: ranks of the sums vs ranks of the outputs.
    from scipy.stats import spearmanr

    sums = (scores.double() @ masks.double().T).numpy()
    assert result.mean == pytest.approx(spearmanr(sums[1], outputs[:, 1]).statistic)
    assert np.isnan(result.per_example[[0, 2]]).all()


def test_lds_path_refuses_nan_outputs_naming_the_example():
    from tdatune.attributors.lambda_path import LambdaPath

    gen = torch.Generator().manual_seed(1)
    path = LambdaPath(torch.tensor([2.0, 1.0], dtype=torch.float64),
                      torch.randn(3, 2, generator=gen, dtype=torch.float64),
                      torch.randn(5, 2, generator=gen, dtype=torch.float64))
    with pytest.raises(ValueError, match="explained example 2"):
        lds_path(path, torch.rand(8, 5, generator=gen) < 0.5, _lds_outputs("nan"), [1e-2])


def test_non_finite_gradients_are_refused_naming_the_example(digits_small):
    task = _lr_task()
    model = init_model(task, 0)
    # Positive weights and a huge (finite) input: only example 5's logits overflow.
    params = {k: v.detach().abs() + 0.1 for k, v in model.named_parameters()}
    inputs = digits_small.train.inputs[:8].clone()
    inputs[5] = 3e38  # finite, but its logits overflow: the loss and gradient of example 5 are not
    data = ArrayDataset(inputs, digits_small.train.targets[:8])
    with pytest.raises(ValueError, match="example 5"):
        per_example_grads(task, model, params, data)


def test_a_retrained_model_with_nan_outputs_is_not_stored(digits_small, tmp_path):
    task, train, test = _lr_task(), digits_small.train, digits_small.test

    def nan_runner(jobs, done):
        done(jobs[0], np.full(len(test), np.nan))

    with pytest.raises(FloatingPointError, match=r"m0000_s0\.npy"):
        build_ground_truth(task, LR_RECIPE, train, test, GroundTruthConfig(n_subsets=2),
                           tmp_path, runner=nan_runner, show_progress=False)
    assert not (tmp_path / "models" / "m0000_s0.npy").exists()


# ---------------------------------------------------------------- kill -9 and resume

_GT_BUILD = textwrap.dedent("""
    from functools import partial
    import torch
    from tdatune.data.digits import load_digits_splits
    from tdatune.evaluate.groundtruth import GroundTruthConfig, build_ground_truth
    from tdatune.models.small import MLP, LogisticRegression
    from tdatune.models.task import Task
    from tdatune.models.training import TrainRecipe

    def build(out, backend, subsets):
        import os
        import tdatune.models.batched as batched

        torch.set_num_threads(1)
        if os.environ.get("TDATUNE_TEST_SAVE_EVERY_EPOCH"):
            batched.MAX_CHUNK_SECONDS = 0.0  # the chunk in flight saves after every epoch
        splits = load_digits_splits(n_train=160, n_val=10, n_test=30, seed=2)
        if backend == "sequential":
            task = Task(make_model=partial(LogisticRegression, 64, 10), name="kill-lr")
            recipe = TrainRecipe(optimizer="lbfgs", epochs=1, lbfgs_iters=15, weight_decay=1e-2)
            options = {}
        else:
            task = Task(make_model=partial(MLP, 64, (32,), 10), name="kill-mlp")
            recipe = TrainRecipe(optimizer="sgd", epochs=25, lr=0.05, batch_size=16,
                                 momentum=0.9, weight_decay=1e-3)
            options = {"chunk_size": 3}
        return build_ground_truth(task, recipe, splits.train, splits.test,
                                  GroundTruthConfig(n_subsets=int(subsets), alpha=0.5), out,
                                  show_progress=False, backend=backend,
                                  backend_options=options)
""")


def _build_here(out: Path, backend: str, subsets: int):
    """The same build as the subprocess's, in this process (one torch thread, like it)."""
    namespace: dict = {}
    exec(_GT_BUILD, namespace)
    return namespace["build"](out, backend, subsets)


def _chunk_state_saved(models: Path) -> bool:
    """Whether a batched chunk still to finish has saved its in-flight state."""
    jobs, state = models / ".batched_chunk.json", models / ".batched_chunk.pt"
    try:
        subset, replicate, _ = json.loads(jobs.read_text())["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return False
    return state.exists() and not (models / f"m{subset:04d}_s{replicate}.npy").exists()


# Installed only in the subprocess: a real SIGKILL of the process by itself at a defined point,
# right after a write completes, so that what is on disk when it dies does not depend on timing.
_KILL_HOOK = textwrap.dedent("""
    import os, re, signal
    from pathlib import Path
    import tdatune.utils.atomic as atomic

    _point, _count = os.environ["TDATUNE_TEST_KILL_AT"].split(":")
    _real_write = atomic.atomic_write_bytes

    def _write_then_maybe_die(path, data, **kwargs):
        written = _real_write(path, data, **kwargs)
        path = Path(path)
        at = (re.fullmatch(r"m\\d+_s\\d+\\.npy", path.name) if _point == "model"
              else path.name == ".batched_chunk.pt")
        if at and len(list(path.parent.glob("m*_s*.npy"))) >= int(_count):
            os.kill(os.getpid(), signal.SIGKILL)
        return written

    atomic.atomic_write_bytes = _write_then_maybe_die
""")


def _run_and_kill(out: Path, backend: str, subsets: int, kill_after: int,
                  at: str = "model") -> int:
    """Run the build in a subprocess that SIGKILLs itself at a defined point: right after the
    ``kill_after``-th model file is stored (``at="model"``), or right after a chunk in flight
    saves its state once ``kill_after`` model files exist (``at="chunk_state"``); return how
    many model files existed then."""
    env = {**os.environ, "TDATUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "TDATUNE_TEST_SAVE_EVERY_EPOCH": "1", "TDATUNE_TEST_KILL_AT": f"{at}:{kill_after}",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = _GT_BUILD + _KILL_HOOK + "\nimport sys\nbuild(*sys.argv[1:])\n"
    proc = subprocess.run([sys.executable, "-c", code, str(out), backend, str(subsets)],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was not killed at its kill point (exit {proc.returncode}): "
        + proc.stderr.decode()[-2000:])
    return len(list((out / "models").glob("m*.npy")))


def test_kill_9_then_resume_equals_an_uninterrupted_run_exactly(tmp_path):
    """Killed right after its third model is stored, a rerun equals an uninterrupted run."""
    subsets = 12
    killed = _run_and_kill(tmp_path / "killed", "sequential", subsets, kill_after=3)
    assert 3 <= killed < subsets
    assert not (tmp_path / "killed" / "outputs.npy").exists()
    resumed = _build_here(tmp_path / "killed", "sequential", subsets)
    whole = _build_here(tmp_path / "whole", "sequential", subsets)
    assert torch.equal(resumed.masks, whole.masks)
    np.testing.assert_array_equal(resumed.outputs, whole.outputs)


def test_kill_9_during_batched_retraining_resumes_the_chunk_in_flight(tmp_path, capsys):
    """Killed mid-chunk after a state save, a rerun resumes that chunk, bitwise as uninterrupted."""
    # Chunks of 3 models train together; the chunk in flight is recorded (and its state saved
    # every epoch here), so the rerun finishes that same chunk from its saved state and the
    # result equals an uninterrupted run bitwise.
    subsets = 12
    killed = _run_and_kill(tmp_path / "killed", "batched", subsets, kill_after=3,
                           at="chunk_state")
    assert 3 <= killed < subsets
    models = tmp_path / "killed" / "models"
    assert _chunk_state_saved(models)
    assert (models / ".batched_chunk.json").exists()
    capsys.readouterr()
    resumed = _build_here(tmp_path / "killed", "batched", subsets)
    assert "resuming a batched chunk of 3 models" in capsys.readouterr().err
    whole = _build_here(tmp_path / "whole", "batched", subsets)
    np.testing.assert_array_equal(resumed.outputs, whole.outputs)
    assert not (models / ".batched_chunk.json").exists()
    assert not (models / ".batched_chunk.pt").exists()


# ---------------------------------------------------------------- damaged artefacts

@pytest.fixture
def ground_truth(digits_small, tmp_path):
    """A 4-subset ground truth, the jobs each rebuild retrains, and a rebuild function."""
    task, train, test = _lr_task(), digits_small.train, digits_small.test
    cfg = GroundTruthConfig(n_subsets=4, alpha=0.5)
    retrained: list[int] = []

    def runner(jobs, done):
        for job in jobs:
            retrained.append(job.subset)
            done(job, retrain_outputs(task, LR_RECIPE, train, test, masks_of(job), job.seed))

    def masks_of(job):
        return torch.from_numpy(np.load(tmp_path / "gt" / "masks.npy"))[job.subset]

    def build():
        retrained.clear()
        return build_ground_truth(task, LR_RECIPE, train, test, cfg, tmp_path / "gt",
                                  runner=runner, show_progress=False)

    return build(), build, retrained, tmp_path / "gt"


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_model_file_is_retrained_and_said(ground_truth, capsys, damage):
    first, build, retrained, gt_dir = ground_truth
    path = gt_dir / "models" / "m0002_s0.npy"
    if damage == "truncate":
        _truncate(path)
    else:
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
    (gt_dir / "outputs.npy").unlink()
    capsys.readouterr()
    again = build()
    assert retrained == [2]
    assert "m0002_s0.npy" in capsys.readouterr().err
    np.testing.assert_array_equal(again.outputs, first.outputs)


def test_damaged_outputs_are_reassembled_and_masks_redrawn(ground_truth, capsys):
    first, build, retrained, gt_dir = ground_truth
    _truncate(gt_dir / "outputs.npy")
    _truncate(gt_dir / "masks.npy", 0.9)
    with pytest.raises(DamagedFileError, match=r"masks\.npy.*rerun build_ground_truth"):
        load_ground_truth(gt_dir)
    again = build()
    err = capsys.readouterr().err
    assert retrained == [] and "outputs.npy" in err and "masks.npy" in err
    np.testing.assert_array_equal(again.outputs, first.outputs)
    assert torch.equal(again.masks, first.masks)
    np.testing.assert_array_equal(load_ground_truth(gt_dir).outputs, first.outputs)


def test_damaged_manifest_is_named_with_the_fix(ground_truth):
    _, build, _, gt_dir = ground_truth
    _truncate(gt_dir / "manifest.json")
    with pytest.raises(DamagedFileError, match=r"manifest\.json.*delete the whole"):
        build()
    with pytest.raises(DamagedFileError, match=r"manifest\.json"):
        load_ground_truth(gt_dir)


def test_ground_truth_without_records_is_still_read(ground_truth):
    """A run directory written before records existed is read (verified by parsing)."""
    first, build, retrained, gt_dir = ground_truth
    for rec in gt_dir.rglob(".*.check"):
        rec.unlink()
    np.testing.assert_array_equal(load_ground_truth(gt_dir).outputs, first.outputs)
    (gt_dir / "outputs.npy").unlink()
    np.testing.assert_array_equal(build().outputs, first.outputs)
    assert retrained == []


def test_damaged_checkpoint_is_retrained_from_the_epoch_before(digits_small, tmp_path, capsys):
    task = Task(make_model=partial(MLP, 64, (8,), 10), name="faults-mlp")
    data = digits_small.train
    first = train_model(task, data, SGD_RECIPE, seed=3, checkpoint_dir=tmp_path)
    _truncate(tmp_path / "epoch_001.pt")
    with pytest.raises(DamagedFileError, match=r"epoch_001\.pt.*retrains from the last intact"):
        load_checkpoints(tmp_path)
    again = train_model(task, data, SGD_RECIPE, seed=3, checkpoint_dir=tmp_path)
    assert "epoch_001.pt" in capsys.readouterr().err
    assert len(again.checkpoints) == 3
    for a, b in zip(first.checkpoints, again.checkpoints, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    for a, b in zip(first.checkpoints, load_checkpoints(tmp_path), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_training_manifest_is_named(digits_small, tmp_path):
    task = _lr_task()
    train_model(task, digits_small.train, LR_RECIPE, seed=0, checkpoint_dir=tmp_path)
    _truncate(tmp_path / "recipe.json")
    with pytest.raises(DamagedFileError, match=r"recipe\.json"):
        train_model(task, digits_small.train, LR_RECIPE, seed=0, checkpoint_dir=tmp_path)


@pytest.fixture
def feature_store(digits_small, tmp_path, monkeypatch):
    """A 4-chunk gradient store, the chunks each rebuild computes, and a rebuild function."""
    task = _lr_task()
    model = init_model(task, 0)
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = digits_small.train.subset(torch.arange(100))
    real = store_module.per_example_grads
    computed: list[int] = []

    def counting(task_, model_, params_, part, **kwargs):
        computed.append(len(part))
        return real(task_, model_, params_, part, **kwargs)

    monkeypatch.setattr(store_module, "per_example_grads", counting)

    def build():
        computed.clear()
        return build_gradient_store(tmp_path / "store", task, model, params, data, chunk_rows=25)

    expected = real(task, model, params, data).numpy()
    build()
    return build, computed, tmp_path / "store", expected


def test_corrupted_feature_chunk_is_named_then_recomputed(feature_store, capsys):
    build, computed, directory, expected = feature_store
    array = np.load(directory / "features.npy", mmap_mode="r+")
    array[60, 3] += 1.0  # chunk 2 (rows 50..74)
    array.flush()
    del array
    with pytest.raises(DamagedFileError, match=r"features\.npy.*chunk 2.*rerun the build"):
        FeatureStore(directory)[0:5]
    store = build()
    assert computed == [25] and "[2]" in capsys.readouterr().err
    np.testing.assert_array_equal(store[:], expected)


def test_truncated_feature_array_is_reallocated_and_recomputed(feature_store, capsys):
    build, computed, directory, expected = feature_store
    _truncate(directory / "features.npy", 0.6)
    with pytest.raises(DamagedFileError, match=r"features\.npy"):
        FeatureStore(directory).to_tensor()
    store = build()
    assert computed == [25, 25, 25, 25] and "reallocated" in capsys.readouterr().err
    np.testing.assert_array_equal(store[:], expected)


def test_damaged_chunk_record_is_recomputed(feature_store):
    build, computed, directory, expected = feature_store
    _truncate(directory / "chunks" / "c000001.json")
    store = build()
    assert computed == [25]
    np.testing.assert_array_equal(store[:], expected)


def test_damaged_store_manifest_is_named(feature_store):
    build, _, directory, _ = feature_store
    _truncate(directory / "manifest.json")
    with pytest.raises(DamagedFileError, match=r"manifest\.json.*delete the store directory"):
        build()


def test_truncated_summary_or_cell_json_is_named(tmp_path):
    for name in ("summary.json", "cells/c0001.json", "sweep.json"):
        path = atomic_write_json(tmp_path / name, {"lds": 0.5, "lam": 1e-3})
        _truncate(path)
        with pytest.raises(DamagedFileError, match=name.split("/")[-1]):
            read_json(path)
        # Without its record the JSON parser is the check, and still names the file.
        record_path(path).unlink()
        with pytest.raises(DamagedFileError, match=r"not valid JSON"):
            read_json(path)
