"""Memory and disk that featurization needs, estimated before any long work, and a refusal,
naming the numbers and the fix, of a run that would not fit.

What is counted (the arrays tdatune allocates; the model's activations and the input batch
are not, pass them as ``extra_bytes`` when they are large):

* gradients in flight: 2 x [chunk, p] in the parameters' dtype (the per-layer pieces of one
  batched backward pass and the flat rows they are written into);
* the projected chunk [chunk, d] and the projection matrix (p x d when it is cached whole,
  ``Projector`` does so up to ``CACHE_LIMIT`` entries, else one block of rows);
* the parameters, twice (the model's and the detached copies differentiated);
* with a store: one chunk of store rows [chunk_rows, d] plus the float64 copy its checksum is
  taken on; on disk n x d float32 (``features.npy``) and one small record per chunk;
* in memory: the whole [n, d] result.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tdatune.features.projection import BLOCK_ROWS, CACHE_LIMIT

RECORD_BYTES = 4096  # one chunk record on disk (a small JSON file: one file-system block)
HEADER_BYTES = 128  # the .npy header


class DoesNotFit(RuntimeError):
    """A featurization run needs more memory or disk than there is."""


@dataclass(frozen=True)
class FeaturizationEstimate:
    """Bytes of memory and disk a featurization run needs, with the memory by part."""

    n: int
    width: int
    grad_width: int
    chunk_rows: int
    store_chunk_rows: int | None
    in_memory: bool
    itemsize: int
    store_itemsize: int
    extra_bytes: int
    memory_parts: dict[str, int] = field(default_factory=dict)
    disk_bytes: int = 0

    @property
    def memory_bytes(self) -> int:
        """Resident memory needed, all parts together."""
        return sum(self.memory_parts.values())

    def describe(self) -> str:
        """One line: the memory by part and the disk."""
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.memory_parts.items() if v)
        disk = f"; disk {format_bytes(self.disk_bytes)}" if self.disk_bytes else ""
        return f"memory {format_bytes(self.memory_bytes)} ({parts}){disk}"


def format_bytes(size: float) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def projector_bytes(grad_width: int, width: int, itemsize: int = 4) -> int:
    """Memory of a ``Projector`` from ``grad_width`` to ``width`` (0 when nothing is projected):
    the whole p x d matrix when it is cached, else one block of rows and its cast."""
    if width >= grad_width:
        return 0
    if grad_width * width <= CACHE_LIMIT:
        return grad_width * width * itemsize
    return 2 * min(BLOCK_ROWS, grad_width) * width * itemsize


def estimate_featurization(
    n: int, width: int, *, grad_width: int, chunk_rows: int = 256,
    dtype: torch.dtype | np.dtype | str = torch.float32, store_chunk_rows: int | None = None,
    in_memory: bool = False, num_params: int | None = None, proj_bytes: int | None = None,
    extra_bytes: int = 0,
) -> FeaturizationEstimate:
    """Memory and disk for per-example gradients of ``n`` examples, ``grad_width`` = p
    gradient dimensions each, kept at ``width`` = d (d < p: projected), ``chunk_rows``
    examples differentiated at a time; ``store_chunk_rows`` set: written to a feature store
    in chunks of that many rows; ``in_memory``: the whole [n, d] result kept in memory.
    ``proj_bytes`` defaults to what a ``Projector`` holds, ``num_params`` to ``grad_width``."""
    if min(n, width, grad_width, chunk_rows) < 1 or (store_chunk_rows or 1) < 1:
        raise ValueError(f"an estimate needs n, width, grad_width and chunk sizes >= 1; got n={n}"
                         f", width={width}, grad_width={grad_width}, chunk_rows={chunk_rows}, "
                         f"store_chunk_rows={store_chunk_rows}")
    item = _itemsize(dtype)
    chunk = min(chunk_rows, n if store_chunk_rows is None else min(n, store_chunk_rows))
    projected = width < grad_width
    parts = {
        "gradients in flight": 2 * chunk * grad_width * item,
        "projected chunk": chunk * width * item if projected else 0,
        "projection matrix": (projector_bytes(grad_width, width, item) if proj_bytes is None
                              else int(proj_bytes)),
        "parameters": 2 * (grad_width if num_params is None else num_params) * item,
    }
    disk = 0
    if store_chunk_rows is not None:
        rows = min(n, store_chunk_rows)
        parts["store chunk"] = rows * width * (item + 8)  # rows + float64 copy for the checksum
        disk = n * width * 4 + HEADER_BYTES + math.ceil(n / store_chunk_rows) * RECORD_BYTES
    if in_memory:
        parts["features in memory"] = n * width * item
    if extra_bytes:
        parts["other (given)"] = int(extra_bytes)
    return FeaturizationEstimate(
        n=n, width=width, grad_width=grad_width, chunk_rows=chunk_rows,
        store_chunk_rows=store_chunk_rows, in_memory=in_memory, itemsize=item, store_itemsize=4,
        extra_bytes=int(extra_bytes), memory_parts=parts, disk_bytes=disk)


def estimate_gradients(params: dict[str, torch.Tensor], n: int, *, projector: object = None,
                       chunk_size: int = 256, store_chunk_rows: int | None = None,
                       in_memory: bool = False, extra_bytes: int = 0) -> FeaturizationEstimate:
    """:func:`estimate_featurization` for per-example gradients w.r.t. ``params`` (projected by
    ``projector``: a ``Projector``, a per-layer ``KroneckerProjector`` or None), as
    ``per_example_grads`` (``in_memory=True``) or ``build_gradient_store``
    (``store_chunk_rows``) compute them. For a per-layer projection the gradient chunk is an
    upper bound: layers projected from their factors never form their rows."""
    p = sum(v.numel() for v in params.values())
    first = next(iter(params.values()))
    width = int(getattr(projector, "d", p)) if projector is not None else p
    return estimate_featurization(n, width, grad_width=p, chunk_rows=chunk_size,
                                  dtype=first.dtype, store_chunk_rows=store_chunk_rows,
                                  in_memory=in_memory, num_params=p,
                                  proj_bytes=_held_by(projector), extra_bytes=extra_bytes)


def _held_by(projector: object) -> int | None:
    """Bytes a projector holds (None: as a ``Projector`` of its width would)."""
    if projector is None or getattr(projector, "kind", "") == "identity":
        return 0
    cached = getattr(projector, "_cached", None)
    if isinstance(cached, torch.Tensor):
        return cached.numel() * cached.element_size()
    sides = getattr(projector, "sides", None)
    if sides is None:
        return None
    held = sum(t.numel() * t.element_size() for side in sides
               for t in (getattr(side, "p_in", None), getattr(side, "p_out", None))
               if isinstance(t, torch.Tensor))
    dense = getattr(projector, "dense", None)  # the parameters outside factored layers
    if dense is not None:
        held += _held_by(dense) or projector_bytes(dense.p, dense.d)
    return held


# ---------------------------------------------------------------------- what there is


def available_memory() -> int | None:
    """Bytes of memory available to this process: psutil's ``available`` if psutil is
    installed, else ``MemAvailable`` of /proc/meminfo, lowered to a cgroup's remaining limit;
    None where none of these can be read."""
    found: list[int] = []
    try:
        import psutil

        found.append(int(psutil.virtual_memory().available))
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        found.append(int(line.split()[1]) * 1024)
        except OSError:
            pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap, used = Path(limit).read_text().strip(), Path(usage).read_text().strip()
        except OSError:
            continue
        if cap.isdigit() and int(cap) < 1 << 60:
            found.append(max(0, int(cap) - int(used)))
    return min(found) if found else None


def free_disk(directory: str | Path) -> int:
    """Free bytes on the file system that holds ``directory`` (or its nearest existing
    parent, when it does not exist yet)."""
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return int(shutil.disk_usage(path).free)


def allocated_bytes(path: str | Path) -> int:
    """Bytes already allocated on disk for ``path`` (0 when it does not exist); a sparse
    ``features.npy`` counts only the chunks written so far."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    blocks = getattr(st, "st_blocks", None)
    return int(blocks) * 512 if blocks is not None else int(st.st_size)


# ---------------------------------------------------------------------- refusal


def check_fits(estimate: FeaturizationEstimate, *, directory: str | Path | None = None,
               already_on_disk: int = 0, check_memory: bool = True,
               what: str = "featurization") -> None:
    """Refuse (:class:`DoesNotFit`) a run whose estimated memory exceeds the memory available,
    or whose store (in ``directory``) exceeds the free disk plus ``already_on_disk`` bytes it
    has already allocated there; the message names the numbers and the fix (a smaller
    projection dimension, a smaller chunk size, a feature store, a larger disk).

    Call it before any long work, e.g. in an attributor before ``per_example_grads``:
    ``check_fits(estimate_gradients(params, len(train), projector=projector,
    chunk_size=chunk, in_memory=True))``."""
    problems: list[str] = []
    memory = available_memory() if check_memory else None
    if memory is not None and estimate.memory_bytes > memory:
        problems.append(_memory_problem(estimate, memory))
    if directory is not None and estimate.disk_bytes:
        need = max(0, estimate.disk_bytes - int(already_on_disk))
        free = free_disk(directory)
        if need > free:
            problems.append(_disk_problem(estimate, need, free, directory))
    if problems:
        raise DoesNotFit(f"{what} of {estimate.n:,} examples would not fit: "
                         + " ".join(problems)
                         + " (The estimate counts tdatune's own arrays; pass check_fit=False "
                           "to run anyway.)")


def _memory_problem(est: FeaturizationEstimate, available: int) -> str:
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in
                      sorted(est.memory_parts.items(), key=lambda kv: -kv[1]) if v)
    fixes = []
    if est.in_memory and est.store_chunk_rows is None:
        fixes.append("keep the features on disk with a feature store "
                     "(tdatune.features.store.build_gradient_store), which holds one chunk")
    d = _largest(lambda w: _with(est, width=w).memory_bytes <= available, est.width - 1)
    if d and est.width > 1:
        fixes.append(f"a smaller projection, proj_dim <= {d}")
    c = _largest(lambda r: _with(est, chunk_rows=r).memory_bytes <= available,
                 est.chunk_rows - 1)
    if c:
        fixes.append(f"a smaller gradient chunk, chunk size <= {c} (now {est.chunk_rows})")
    if est.store_chunk_rows is not None:
        s = _largest(lambda r: _with(est, store_chunk_rows=r).memory_bytes <= available,
                     est.store_chunk_rows - 1)
        if s:
            fixes.append(f"smaller store chunks, chunk_rows <= {s} (now {est.store_chunk_rows})")
    if not fixes:
        fixes.append("free memory, or run on a machine with more")
    return (f"it needs about {format_bytes(est.memory_bytes)} of memory ({parts}) but "
            f"{format_bytes(available)} is available. Fix: " + "; or ".join(fixes) + ".")


def _disk_problem(est: FeaturizationEstimate, need: int, free: int,
                  directory: str | Path) -> str:
    fixes = [f"put the store on a disk with at least {format_bytes(need)} free"]
    rows = est.n * est.store_itemsize  # bytes per projection dimension
    overhead = est.disk_bytes - est.width * rows  # header and chunk records
    d = min(est.width - 1, (free - overhead) // rows)  # a new store of width d fits
    if d >= 1:
        fixes.append(f"a smaller projection, proj_dim <= {d}")
    return (f"its feature store in {directory} needs {format_bytes(need)} more on disk "
            f"([{est.n:,}, {est.width:,}] float32 and chunk records) but "
            f"{format_bytes(free)} is free there. Fix: " + "; or ".join(fixes) + ".")


def _with(est: FeaturizationEstimate, **change: int) -> FeaturizationEstimate:
    """The estimate with another width, chunk size or store chunk size."""
    args = {"width": est.width, "chunk_rows": est.chunk_rows,
            "store_chunk_rows": est.store_chunk_rows, **change}
    proj = est.memory_parts["projection matrix"]
    if args["width"] != est.width:  # as a Projector (gaussian, rademacher) of that width holds
        proj = projector_bytes(est.grad_width, args["width"], est.itemsize)
    return estimate_featurization(
        est.n, args["width"], grad_width=est.grad_width, chunk_rows=args["chunk_rows"],
        dtype=_DTYPES[est.itemsize], store_chunk_rows=args["store_chunk_rows"],
        in_memory=est.in_memory, num_params=est.memory_parts["parameters"] // (2 * est.itemsize),
        proj_bytes=proj, extra_bytes=est.extra_bytes)


def _largest(ok: Callable[[int], bool], upper: int) -> int:
    """The largest k in [1, upper] with ``ok(k)`` (``ok`` increasing as k falls), or 0."""
    if upper < 1 or not ok(1):
        return 0
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


_DTYPES = {1: torch.uint8, 2: torch.float16, 4: torch.float32, 8: torch.float64}


def _itemsize(dtype: torch.dtype | np.dtype | str) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty(0, dtype=dtype).element_size()
    return int(np.dtype(dtype).itemsize)


__all__ = ["DoesNotFit", "FeaturizationEstimate", "allocated_bytes", "available_memory",
           "check_fits", "estimate_featurization", "estimate_gradients", "format_bytes",
           "free_disk", "projector_bytes"]
