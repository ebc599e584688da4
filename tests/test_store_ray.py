"""Gradient stores featurized on Ray equal the one-process store, and resume either way.

Byte equality is expected, not just float closeness: a Ray task computes its chunk with the
same function as the one-process build (``gradient_rows`` on the same rows, same
``grad_chunk_size``), in the same torch build, with one torch thread like this module's
driver, and CPU kernels are deterministic at a fixed thread count.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import tdatune.features.store as store_module
from tdatune.features.projection import Projector
from tdatune.features.store import FeatureStore, build_gradient_store, open_gradient_store
from tdatune.models.small import MLP
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe, init_model, train_model, trainable

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHUNK_ROWS = 25  # 120 digits -> chunks of 25, 25, 25, 25 and 20 rows
P = 64 * 16 + 16 + 16 * 10 + 10


def mlp_here(num_classes: int) -> MLP:
    """Defined in this test module so that Ray workers must import it: they can only when the
    local instance hands them the driver's import path (as for a user's own task module)."""
    return MLP(64, (16,), num_classes)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance (2 CPUs) for the module, started the way the builder starts
    one; skipped with the reason when Ray is missing or cannot start here."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'tdatune[ray]')")
    from tdatune.utils.raycluster import RayConnection

    connection = RayConnection(None, num_cpus=2)
    try:
        ray = connection.__enter__()
    except Exception as exc:  # any start failure means: no Ray here
        pytest.skip(f"a local Ray instance could not start here: {type(exc).__name__}: {exc}")
    yield ray
    connection.__exit__(None, None, None)
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def trained(digits_small):
    """A small MLP trained briefly with SGD: (task, model, params). The model holds other
    (initial) weights than ``params``: gradients are taken at ``params``, and the Ray workers
    must be sent those, not the model's own."""
    task = Task(make_model=partial(mlp_here, digits_small.num_classes), name="mlp-here")
    recipe = TrainRecipe(optimizer="sgd", epochs=2, lr=0.05, batch_size=32, momentum=0.9)
    state = train_model(task, digits_small.train, recipe, seed=0).state
    model = init_model(task, 1)
    return task, model, trainable(model, state)


def _projector(proj_dim: int | None) -> Projector | None:
    return Projector(P, proj_dim, seed=5) if proj_dim else None


def _autograd_rows(task: Task, model, params, data, rows: list[int]) -> torch.Tensor:
    """Per-example loss gradients by one plain backward pass per example."""
    net = task.make_model()
    net.load_state_dict({**model.state_dict(), **params})
    net.eval()
    out = []
    for i in rows:
        net.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(data.inputs[i : i + 1]),
                                                 data.targets[i : i + 1])
        loss.backward()
        grads = dict(net.named_parameters())
        out.append(torch.cat([grads[k].grad.flatten() for k in params]))
    return torch.stack(out)


def _same_store(a: Path, b: Path) -> None:
    """Two store directories hold the same manifest, the same bytes and the same records."""
    assert json.loads((a / "manifest.json").read_text()) == \
        json.loads((b / "manifest.json").read_text())
    assert (a / "features.npy").read_bytes() == (b / "features.npy").read_bytes()
    for record in sorted((a / "chunks").glob("c*.json")):
        assert json.loads(record.read_text())["sha256"] == \
            json.loads((b / "chunks" / record.name).read_text())["sha256"]
    assert len(list((b / "chunks").glob("c*.json"))) == FeatureStore(a).num_chunks


@pytest.fixture(scope="module")
def one_process(digits_small, trained, tmp_path_factory):
    """The reference stores, unprojected and projected, built in this process."""
    task, model, params = trained
    return {proj_dim: build_gradient_store(tmp_path_factory.mktemp(f"one-{proj_dim}"), task,
                                           model, params, digits_small.train,
                                           projector=_projector(proj_dim), chunk_rows=CHUNK_ROWS,
                                           grad_chunk_size=16).directory
            for proj_dim in (None, 32)}


@pytest.mark.parametrize("proj_dim", [None, 32])
def test_ray_store_equals_the_one_process_store(ray_cluster, digits_small, trained, one_process,
                                                tmp_path, proj_dim):
    from tdatune.features.distributed import build_gradient_store_ray

    task, model, params = trained
    projector = _projector(proj_dim)
    store = build_gradient_store_ray(tmp_path, task, model, params, digits_small.train,
                                     projector=projector, chunk_rows=CHUNK_ROWS,
                                     grad_chunk_size=16, num_workers=2)
    assert store.complete and store.shape == (120, proj_dim or P)
    _same_store(one_process[proj_dim], tmp_path)
    assert ray_cluster.is_initialized()  # it leaves running the instance it did not start
    # Against plain autograd, one example at a time (first, middle, last chunk's last row).
    rows = [0, 57, 119]
    expected = _autograd_rows(task, model, params, digits_small.train, rows)
    if projector is not None:
        expected = expected @ projector.matrix()
    np.testing.assert_allclose(store[rows], expected.numpy(), rtol=1e-4, atol=1e-6)


def test_ray_completes_a_store_half_built_in_one_process(ray_cluster, digits_small, trained,
                                                         one_process, tmp_path, monkeypatch):
    from tdatune.features.distributed import build_gradient_store_ray

    task, model, params = trained
    projector = _projector(32)
    reference = FeatureStore(one_process[32])
    half = open_gradient_store(tmp_path, task, params, digits_small.train, projector=projector,
                               chunk_rows=CHUNK_ROWS)
    for chunk in (0, 3):
        start, stop = half.chunk_bounds(chunk)
        half.write_chunk(chunk, reference[start:stop])
    kept = {c: half._record(c).stat().st_mtime_ns for c in (0, 3)}
    written: list[int] = []
    real_write = FeatureStore.write_chunk

    def counting(self, chunk, rows):
        written.append(chunk)
        real_write(self, chunk, rows)

    monkeypatch.setattr(FeatureStore, "write_chunk", counting)
    build_gradient_store_ray(tmp_path, task, model, params, digits_small.train,
                             projector=projector, chunk_rows=CHUNK_ROWS, grad_chunk_size=16)
    assert sorted(written) == [1, 2, 4]  # only the missing chunks were computed
    assert {c: half._record(c).stat().st_mtime_ns for c in (0, 3)} == kept
    _same_store(one_process[32], tmp_path)


def test_a_killed_ray_build_is_resumed_by_the_one_process_build(
        ray_cluster, digits_small, trained, one_process, tmp_path, monkeypatch):
    from tdatune.features.distributed import build_gradient_store_ray

    task, model, params = trained
    real_write = FeatureStore.write_chunk

    def dies_after_two(self, chunk, rows):
        real_write(self, chunk, rows)
        if len(self.completed_chunks()) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(FeatureStore, "write_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_gradient_store_ray(tmp_path, task, model, params, digits_small.train,
                                 chunk_rows=CHUNK_ROWS, grad_chunk_size=16, num_workers=2)
    done = FeatureStore(tmp_path).completed_chunks()
    assert len(done) == 2
    monkeypatch.setattr(FeatureStore, "write_chunk", real_write)
    calls: list[int] = []
    real_grads = store_module.per_example_grads

    def counting(*args, **kwargs):
        calls.append(len(args[3]))
        return real_grads(*args, **kwargs)

    monkeypatch.setattr(store_module, "per_example_grads", counting)
    build_gradient_store(tmp_path, task, model, params, digits_small.train,
                         chunk_rows=CHUNK_ROWS, grad_chunk_size=16)
    assert len(calls) == 3  # the chunks the Ray run did not record
    _same_store(one_process[None], tmp_path)
    # And a Ray build of a finished store submits nothing.
    assert build_gradient_store_ray(tmp_path, task, model, params, digits_small.train,
                                    chunk_rows=CHUNK_ROWS, grad_chunk_size=16).complete


def test_ray_store_with_a_kronecker_projection(ray_cluster, digits_small, trained, tmp_path):
    """Workers rebuild the per-layer Kronecker projection from the model they rebuilt: the
    store equals the one-process one, and each row the projected autograd gradient."""
    from tdatune.features.distributed import build_gradient_store_ray
    from tdatune.features.factored import KroneckerProjector

    task, model, params = trained
    projector = KroneckerProjector(model, params, 40, seed=2)
    ray_dir, one_dir = tmp_path / "ray", tmp_path / "one"
    build_gradient_store_ray(ray_dir, task, model, params, digits_small.train,
                             projector=projector, chunk_rows=CHUNK_ROWS, grad_chunk_size=16,
                             num_workers=2)
    build_gradient_store(one_dir, task, model, params, digits_small.train, projector=projector,
                         chunk_rows=CHUNK_ROWS, grad_chunk_size=16)
    _same_store(one_dir, ray_dir)
    rows = [3, 100]
    grads = _autograd_rows(task, model, params, digits_small.train, rows)
    cols, start, parts = [], 0, []
    for v in params.values():
        cols.append(grads[:, start : start + v.numel()])
        start += v.numel()
    for i, side in enumerate(projector.sides):  # layers in order: [W | b] per layer
        w, b = cols[2 * i], cols[2 * i + 1]
        m = torch.cat([w.reshape(len(rows), side.d_out, -1), b[:, :, None]], dim=2)
        p_in = side.p_in if side.p_in is not None else torch.eye(side.d_in)
        p_out = side.p_out if side.p_out is not None else torch.eye(side.d_out)
        parts.append(torch.einsum("ok,boi,ij->bkj", p_out, m, p_in).reshape(len(rows), -1))
    np.testing.assert_allclose(FeatureStore(ray_dir)[rows], torch.cat(parts, 1).numpy(),
                               rtol=1e-4, atol=1e-6)
