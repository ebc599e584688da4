"""Memory and disk estimates of featurization against hand arithmetic; runs that would not
fit (monkeypatched memory and disk) refused before any work, naming the numbers and a fix
that does fit."""

from __future__ import annotations

import re
import shutil
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import tdatune.features.budget as budget
import tdatune.features.store as store_module
from tdatune.data.streaming import stream_dataset
from tdatune.features.budget import (
    DoesNotFit,
    check_fits,
    estimate_featurization,
    estimate_gradients,
    format_bytes,
)
from tdatune.features.projection import Projector
from tdatune.features.store import build_gradient_store, open_gradient_store
from tdatune.models.task import make_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hand_memory(n: int, w: int, p: int, chunk: int, *, item: int = 4, store_rows: int = 0,
                in_memory: bool = False) -> int:
    """The documented parts, written out: 2 gradient chunks, the projected chunk, the cached
    projection matrix, the parameters twice, a store chunk and its float64 copy, the result."""
    projected = w < p
    return (2 * chunk * p * item + (chunk * w * item if projected else 0)
            + (p * w * item if projected else 0) + 2 * p * item
            + store_rows * w * (item + 8) + (n * w * item if in_memory else 0))


def test_estimate_equals_hand_arithmetic():
    est = estimate_featurization(1000, 64, grad_width=10_000, chunk_rows=32,
                                 store_chunk_rows=100)
    assert est.memory_parts == {
        "gradients in flight": 2 * 32 * 10_000 * 4, "projected chunk": 32 * 64 * 4,
        "projection matrix": 10_000 * 64 * 4, "parameters": 2 * 10_000 * 4,
        "store chunk": 100 * 64 * (4 + 8)}
    assert est.memory_bytes == hand_memory(1000, 64, 10_000, 32, store_rows=100)
    assert est.disk_bytes == 1000 * 64 * 4 + 128 + 10 * 4096  # array, header, 10 records
    mem = estimate_featurization(1000, 64, grad_width=10_000, chunk_rows=32, in_memory=True,
                                 dtype=torch.float64)
    assert mem.disk_bytes == 0
    assert mem.memory_bytes == hand_memory(1000, 64, 10_000, 32, item=8, in_memory=True)
    # Unprojected: no projection, no projected chunk; a chunk larger than n counts n rows.
    full = estimate_featurization(10, 500, grad_width=500, chunk_rows=256, in_memory=True)
    assert full.memory_bytes == 2 * 10 * 500 * 4 + 2 * 500 * 4 + 10 * 500 * 4
    # A projection too large to cache holds one block of rows (and its cast), not p x d.
    big = estimate_featurization(10, 128, grad_width=1 << 20, chunk_rows=1)
    assert big.memory_parts["projection matrix"] == 2 * 4096 * 128 * 4


def test_estimate_from_parameters_and_a_projector():
    params = {"w": torch.zeros(30, 20), "b": torch.zeros(30)}
    est = estimate_gradients(params, 500, projector=Projector(630, 16, seed=0), chunk_size=50,
                             store_chunk_rows=128)
    assert est.memory_bytes == hand_memory(500, 16, 630, 50, store_rows=128)
    assert est.disk_bytes == 500 * 16 * 4 + 128 + 4 * 4096
    assert estimate_gradients(params, 7, in_memory=True).memory_bytes == hand_memory(
        7, 630, 630, 7, in_memory=True)


def test_memory_refusal_names_the_numbers_and_fixes_that_fit(monkeypatch):
    n, p, chunk = 100_000, 50_000, 256
    need = hand_memory(n, p, p, chunk, in_memory=True)
    available = 400 * 2**20
    monkeypatch.setattr(budget, "available_memory", lambda: available)
    est = estimate_featurization(n, p, grad_width=p, chunk_rows=chunk, in_memory=True)
    with pytest.raises(DoesNotFit) as err:
        check_fits(est, what="TRAK")
    msg = str(err.value)
    assert f"about {format_bytes(need)} of memory" in msg and format_bytes(available) in msg
    assert "TRAK of 100,000 examples" in msg and "build_gradient_store" in msg
    d = int(re.search(r"proj_dim <= (\d+)", msg).group(1))
    assert hand_memory(n, d, p, chunk, in_memory=True) <= available
    assert hand_memory(n, d + 1, p, chunk, in_memory=True) > available
    # Fits once projected to that d; nothing raised with enough memory.
    check_fits(estimate_featurization(n, d, grad_width=p, chunk_rows=chunk, in_memory=True))
    monkeypatch.setattr(budget, "available_memory", lambda: need)
    check_fits(est)


def test_chunk_fix_is_the_largest_chunk_that_fits(monkeypatch):
    p, chunk, rows = 1_000_000, 512, 1024
    # proj_bytes=0 (given): the hand formula less the p x d matrix
    available = hand_memory(10_000, 64, p, 100, store_rows=rows) - p * 64 * 4 + 10
    monkeypatch.setattr(budget, "available_memory", lambda: available)
    est = estimate_featurization(10_000, 64, grad_width=p, chunk_rows=chunk,
                                 store_chunk_rows=rows, proj_bytes=0)
    with pytest.raises(DoesNotFit, match=r"chunk size <= (\d+) \(now 512\)") as err:
        check_fits(est)
    assert int(str(err.value).split("chunk size <= ")[1].split(" ")[0]) == 100


class Counting(Dataset):
    """Pairs (x, y) that count the examples read."""

    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,),
                                                                          generator=gen)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.x[i], self.y[i]


def linear_setup():
    def loss(out, y):
        return nn.functional.cross_entropy(out, y, reduction="none")

    task = make_task(nn.Linear(5, 3), loss, lambda out, y: out[:, 0], name="lin")
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    return task, model, {k: v.detach() for k, v in model.named_parameters()}


def never(*args, **kwargs):
    raise AssertionError("gradients computed although the run was refused")


def test_store_build_refused_before_any_work_when_memory_is_short(tmp_path, monkeypatch):
    task, model, params = linear_setup()
    data = Counting(40)
    stream = stream_dataset(data)
    projector = Projector(18, 12, seed=0)
    need = hand_memory(40, 12, 18, 8, store_rows=10)
    real = store_module.per_example_grads
    monkeypatch.setattr(store_module, "per_example_grads", never)
    monkeypatch.setattr(budget, "available_memory", lambda: need - 1)
    with pytest.raises(DoesNotFit, match="build_gradient_store of 40 examples") as err:
        build_gradient_store(tmp_path / "s", task, model, params, stream, projector=projector,
                             chunk_rows=10, grad_chunk_size=8)
    assert format_bytes(need) in str(err.value) and "smaller" in str(err.value)
    assert data.reads == 0 and not (tmp_path / "s").exists()  # no fingerprint pass, no file
    monkeypatch.setattr(budget, "available_memory", lambda: need)
    monkeypatch.setattr(store_module, "per_example_grads", real)
    build_gradient_store(tmp_path / "s", task, model, params, stream, projector=projector,
                         chunk_rows=10, grad_chunk_size=8)


def test_store_refused_when_the_disk_is_short_and_resumed_when_allocated(tmp_path,
                                                                         monkeypatch):
    task, model, params = linear_setup()
    data = Counting(20)
    projector = Projector(18, 12, seed=0)
    overhead = 128 + 2 * 4096  # header and two chunk records
    monkeypatch.setattr(budget, "free_disk", lambda directory: overhead + 20 * 4 * 7 + 3)
    for build in (build_gradient_store, open_gradient_store):
        args = (task, model, params) if build is build_gradient_store else (task, params)
        with pytest.raises(DoesNotFit, match="disk") as err:
            build(tmp_path / "s", *args, stream_dataset(data), projector=projector,
                  chunk_rows=10)
        msg = str(err.value)
        assert f"needs {format_bytes(20 * 12 * 4 + overhead)} more on disk" in msg
        assert "proj_dim <= 7" in msg and str(tmp_path / "s") in msg
    assert data.reads == 0 and not (tmp_path / "s").exists()
    build_gradient_store(tmp_path / "s", task, model, params, stream_dataset(data),
                         projector=projector, chunk_rows=10, check_fit=False)
    # A complete store holds its disk already: reopening it needs nothing more.
    monkeypatch.setattr(budget, "free_disk", lambda directory: 0)
    assert build_gradient_store(tmp_path / "s", task, model, params, stream_dataset(data),
                                projector=projector, chunk_rows=10).complete


def test_available_memory_and_free_disk_read_the_system(tmp_path, monkeypatch):
    free = budget.free_disk(tmp_path / "not" / "yet")
    assert abs(free - shutil.disk_usage(tmp_path).free) < 2**30
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        pytest.skip("no /proc/meminfo")
    monkeypatch.setitem(sys.modules, "psutil", None)  # psutil absent: /proc/meminfo
    got = budget.available_memory()
    assert got is not None and 0 < got <= fields["MemTotal"]
    assert got <= fields["MemAvailable"] * 1.5


def test_a_per_layer_projection_counts_its_factor_matrices_not_p_by_d():
    from tdatune.features.factored import KroneckerProjector
    from tdatune.models.small import MLP

    torch.manual_seed(0)
    model = MLP(40, (30,), 20)
    params = {k: v.detach() for k, v in model.named_parameters()}
    p = sum(v.numel() for v in params.values())  # 41 * 30 + 31 * 20 = 1850
    projector = KroneckerProjector(model, params, 64, seed=0)
    matrices = [t for side in projector.sides for t in (side.p_in, side.p_out) if t is not None]
    assert matrices and projector.dense is None
    held = sum(t.numel() * t.element_size() for t in matrices)
    est = estimate_gradients(params, 100, projector=projector, chunk_size=10)
    assert est.memory_parts["projection matrix"] == held < p * projector.d * 4
    assert est.width == projector.d
