"""On-disk feature stores: same rows as in-memory gradients, per-chunk resume, refusals."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

import tdatune.features.store as store_module
from interrupts import Interrupted
from tdatune.curvature.eigen import fisher_eigensystem
from tdatune.features.gradients import per_example_grads
from tdatune.features.projection import Projector
from tdatune.features.store import FeatureStore, StoreMismatch, build_gradient_store
from tdatune.models.small import LogisticRegression
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe, init_model, train_model, trainable

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(digits_small):
    """A logistic regression trained on the small digits split: (task, model, params)."""
    task = Task(make_model=partial(LogisticRegression, 64, digits_small.num_classes), name="lr")
    recipe = TrainRecipe(optimizer="lbfgs", epochs=1, lbfgs_iters=50, weight_decay=1e-2)
    state = train_model(task, digits_small.train, recipe, seed=0).state
    model = init_model(task, 0)
    model.load_state_dict(state)
    return task, model, trainable(model, state)


def test_store_holds_the_in_memory_gradients(digits_small, trained, tmp_path):
    task, model, params = trained
    store = build_gradient_store(tmp_path, task, model, params, digits_small.train, chunk_rows=32)
    expected = per_example_grads(task, model, params, digits_small.train)
    assert store.shape == tuple(expected.shape) and store.num_chunks == 4 and store.complete
    np.testing.assert_array_equal(store[10:70], expected[10:70].numpy())
    assert isinstance(store.as_memmap(), np.memmap)
    store.verify()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["identity"]["task"] == "lr" and manifest["identity"]["projection"] is None
    assert manifest["shape"] == list(expected.shape) and manifest["dtype"] == "float32"


def test_resume_after_kill_recomputes_only_missing_chunks(digits_small, trained, tmp_path,
                                                          monkeypatch):
    task, model, params = trained
    projector = Projector(650, 24, seed=4)
    fault = Interrupted(monkeypatch, store_module, "per_example_grads", 3)
    with pytest.raises(KeyboardInterrupt):
        build_gradient_store(tmp_path, task, model, params, digits_small.train,
                             projector=projector, chunk_rows=25)
    partial_store = FeatureStore(tmp_path)
    assert partial_store.completed_chunks() == [0, 1]
    with pytest.raises(RuntimeError, match="incomplete"):
        partial_store[0:5]
    # A kill after a chunk's rows were written but before its record: the chunk is redone.
    (tmp_path / "chunks" / "c000001.json").unlink()

    calls = fault.count_only()
    store = build_gradient_store(tmp_path, task, model, params, digits_small.train,
                                 projector=projector, chunk_rows=25)
    assert calls == [25, 25, 25, 20]  # chunks 1, 2, 3 and the short last chunk 4
    expected = per_example_grads(task, model, params, digits_small.train, projector=projector)
    np.testing.assert_allclose(store[:], expected.numpy(), rtol=1e-6, atol=1e-7)


def test_mismatched_manifest_is_refused(digits_small, trained, tmp_path):
    task, model, params = trained
    build_gradient_store(tmp_path, task, model, params, digits_small.train,
                         projector=Projector(650, 16, seed=1), chunk_rows=64)
    with pytest.raises(StoreMismatch, match=r"identity\.projection"):
        build_gradient_store(tmp_path, task, model, params, digits_small.train,
                             projector=Projector(650, 16, seed=2), chunk_rows=64)
    with pytest.raises(StoreMismatch, match=r"identity\.checkpoint"):
        build_gradient_store(tmp_path, task, model, params, digits_small.train,
                             projector=Projector(650, 16, seed=1), chunk_rows=64, checkpoint=3)
    with pytest.raises(StoreMismatch, match=r"identity\.data_fingerprint"):
        build_gradient_store(tmp_path, task, model, params, digits_small.val,
                             projector=Projector(650, 16, seed=1), chunk_rows=64)
    shifted = {k: v + 1 for k, v in params.items()}
    with pytest.raises(StoreMismatch, match="params_fingerprint"):
        build_gradient_store(tmp_path, task, model, shifted, digits_small.train,
                             projector=Projector(650, 16, seed=1), chunk_rows=64)
    with pytest.raises(StoreMismatch, match="chunk_rows"):
        build_gradient_store(tmp_path, task, model, params, digits_small.train,
                             projector=Projector(650, 16, seed=1), chunk_rows=32)


@pytest.mark.parametrize("proj_dim", [None, 40])
def test_memmapped_store_gives_the_in_memory_eigensystem(digits_small, trained, tmp_path,
                                                         proj_dim):
    task, model, params = trained
    projector = Projector(650, proj_dim, seed=7) if proj_dim else None
    store = build_gradient_store(tmp_path, task, model, params, digits_small.train,
                                 projector=projector, chunk_rows=48)
    grads = per_example_grads(task, model, params, digits_small.train, projector=projector)
    on_disk = fisher_eigensystem(store, chunk_rows=17)
    in_memory = fisher_eigensystem(grads)
    assert on_disk.form == ("kernel" if proj_dim is None else "parameter")
    torch.testing.assert_close(on_disk.sigma, in_memory.sigma, rtol=1e-8, atol=1e-12)
    # Compare eigenvectors through a sign-free quantity: the Fisher inverse applied to rows.
    lam = float(in_memory.sigma[0]) * 1e-3
    v = grads[:5].double()

    def solve(eig):
        c = eig.coords(v)
        return (c / (eig.sigma + lam)) @ eig.train_coords.T

    torch.testing.assert_close(solve(on_disk), solve(in_memory), rtol=1e-6, atol=1e-8)
    # And against a dense computation that shares no code with the eigensystem.
    g = grads.double()
    dense = torch.linalg.eigvalsh(g.T @ g / g.shape[0]).flip(0)[: on_disk.sigma.numel()]
    torch.testing.assert_close(on_disk.sigma, dense, rtol=1e-6, atol=1e-9)


def test_store_refuses_bad_chunks(tmp_path):
    store = FeatureStore.open_or_create(tmp_path, shape=(10, 3), identity={"x": 1}, chunk_rows=4)
    assert store.num_chunks == 3 and store.chunk_bounds(2) == (8, 10)
    with pytest.raises(ValueError, match="shape"):
        store.write_chunk(0, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="not finite"):
        store.write_chunk(0, np.full((4, 3), np.nan))
    with pytest.raises(IndexError):
        store.chunk_bounds(3)
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        FeatureStore(tmp_path / "nowhere")
    store.fill(lambda a, b: np.arange(a * 3, b * 3, dtype=np.float32).reshape(b - a, 3))
    np.testing.assert_array_equal(store[:], np.arange(30, dtype=np.float32).reshape(10, 3))
    reopened = FeatureStore.open_or_create(tmp_path, shape=(10, 3), identity={"x": 1},
                                           chunk_rows=4)
    assert reopened.complete and reopened.fill(lambda a, b: 1 / 0) == []


def test_store_chunks_carry_sha256_and_old_sum_only_records_still_verify(tmp_path):
    import hashlib

    from tdatune.utils.atomic import DamagedFileError, atomic_write_json, read_json

    store = FeatureStore.open_or_create(tmp_path, shape=(10, 3), identity={"x": 1}, chunk_rows=4)
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    for c in range(store.num_chunks):
        start, stop = store.chunk_bounds(c)
        store.write_chunk(c, rows[start:stop])
    record = read_json(tmp_path / "chunks" / "c000001.json")
    assert record["sha256"] == hashlib.sha256(rows[4:8].tobytes()).hexdigest()
    np.testing.assert_array_equal(FeatureStore(tmp_path)[:], rows)
    # A store written before chunk checksums: records with a sum only, verified by the sum.
    for c in range(store.num_chunks):
        path = tmp_path / "chunks" / f"c{c:06d}.json"
        old = read_json(path)
        del old["sha256"]
        atomic_write_json(path, old)
    np.testing.assert_array_equal(FeatureStore(tmp_path)[:], rows)
    array = np.load(tmp_path / "features.npy", mmap_mode="r+")
    array[9, 0] = 1e6
    array.flush()
    del array
    with pytest.raises(DamagedFileError, match=r"chunk 2 .*sum"):
        FeatureStore(tmp_path)[:]
