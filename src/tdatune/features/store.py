"""On-disk, chunked, memory-mapped stores of per-example gradients or projected features.

Layout of a store directory::

    manifest.json       shape, dtype, chunk_rows and the identity of what is stored
                        (task, gradient target, seed, checkpoint, projection, data and
                        parameter fingerprints)
    features.npy        the [n, width] array, a .npy file opened as a memory map
    chunks/c000007.json one record per finished chunk of rows (written atomically after the
                        chunk's rows are flushed to features.npy): rows and SHA-256 of
                        their bytes

Rows are computed chunk by chunk and never held whole in memory. A killed run leaves rows
without a completion record; a rerun recomputes exactly those chunks. Reading refuses an
incomplete store, and opening a store with a manifest that does not match the request is
refused with the fields that differ. Reads are lazy: ``store[a:b]`` returns rows from the
memory map, so ``tdatune.curvature.eigen.fisher_eigensystem(store)`` streams it in chunks.

Verified reads: the first read of a store checks every chunk against its record and raises
:class:`~tdatune.utils.atomic.DamagedFileError` naming the damaged chunk; reopening the store
for a build (:meth:`FeatureStore.open_or_create`, :func:`build_gradient_store`) instead drops
the damaged chunks' records (a truncated ``features.npy``: all of them, the array is
reallocated) and says so, and the build recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tdatune.data.base import ArrayDataset
from tdatune.features.budget import (
    allocated_bytes,
    check_fits,
    estimate_featurization,
    estimate_gradients,
)
from tdatune.features.gradients import num_params, per_example_grads
from tdatune.features.projection import Projector
from tdatune.models.task import Params, Task
from tdatune.utils.atomic import (
    DamagedFileError,
    atomic_write_json,
    notice,
    read_json,
    remove_with_record,
)
from tdatune.utils.fingerprint import fingerprint_tensors
from tdatune.utils.progress import progress

STORE_FORMAT = 1
ARRAY_NAME = "features.npy"
_REBUILD = ("rerun the build (build_gradient_store, or the command that made the store) with "
            "the same arguments: it recomputes damaged chunks")


class StoreMismatch(ValueError):
    """A store directory holds features of a different request."""


class FeatureStore:
    """A chunked [n, width] array on disk with per-chunk completion records."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{self.directory} is not a feature store (no manifest.json); "
                                    "create it with FeatureStore.open_or_create")
        self.manifest: dict[str, Any] = read_json(
            manifest_path, "delete the store directory to rebuild it")
        self.shape: tuple[int, int] = tuple(self.manifest["shape"])  # type: ignore[assignment]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.chunk_rows = int(self.manifest["chunk_rows"])
        self._reader: np.memmap | None = None
        self._verified = False

    # ------------------------------------------------------------------ creation
    @classmethod
    def open_or_create(cls, directory: str | Path, *, shape: tuple[int, int],
                       identity: dict[str, Any], dtype: str | np.dtype = "float32",
                       chunk_rows: int = 1024) -> FeatureStore:
        """Open the store in ``directory`` if it matches, or create it; refuse a mismatch."""
        directory = Path(directory)
        n, width = (int(s) for s in shape)
        if n < 1 or width < 1 or chunk_rows < 1:
            raise ValueError(f"a feature store needs n >= 1 rows, width >= 1 and chunk_rows >= 1; "
                             f"got shape {shape}, chunk_rows {chunk_rows}")
        wanted = {"format": STORE_FORMAT, "shape": [n, width], "dtype": np.dtype(dtype).name,
                  "chunk_rows": int(chunk_rows), "identity": json.loads(json.dumps(identity))}
        manifest_path = directory / "manifest.json"
        if manifest_path.exists():
            _check_manifest(directory, read_json(
                manifest_path, "delete the store directory to rebuild it"), wanted)
            if not (directory / ARRAY_NAME).exists():
                raise FileNotFoundError(f"{directory} has a manifest but no {ARRAY_NAME}; delete "
                                        "the directory to rebuild the store")
            store = cls(directory)
            store.repair()
            return store
        directory.mkdir(parents=True, exist_ok=True)
        _allocate(directory, dtype, (n, width))
        (directory / "chunks").mkdir(exist_ok=True)
        atomic_write_json(manifest_path, wanted)
        return cls(directory)

    def repair(self) -> list[int]:
        """Drop the records of damaged chunks so that a build recomputes them (a damaged
        ``features.npy`` is reallocated and every chunk dropped); say so; return them."""
        try:
            self._open_array("r")
        except DamagedFileError as err:
            done = self.completed_chunks()
            for chunk in done:
                remove_with_record(self._record(chunk))
            _allocate(self.directory, self.dtype, self.shape)
            notice(f"{err.path} was damaged ({err.reason}); reallocated it, recomputing all "
                   f"{self.num_chunks} chunks")
            self._reader = None
            return done
        bad = self.damaged_chunks()
        for chunk in bad:
            remove_with_record(self._record(chunk))
        if bad:
            notice(f"feature store {self.directory}: chunk(s) {bad[:10]} did not match their "
                   "records (damaged); recomputing them")
        self._reader = None
        return bad

    # ------------------------------------------------------------------ chunks
    @property
    def num_chunks(self) -> int:
        """Number of chunks of ``chunk_rows`` rows (the last may be shorter)."""
        return -(-self.shape[0] // self.chunk_rows)

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """Rows [start, stop) of one chunk."""
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} out of range 0..{self.num_chunks - 1}")
        start = chunk * self.chunk_rows
        return start, min(self.shape[0], start + self.chunk_rows)

    def _record(self, chunk: int) -> Path:
        return self.directory / "chunks" / f"c{chunk:06d}.json"

    def completed_chunks(self) -> list[int]:
        """Chunks whose completion record exists."""
        return [c for c in range(self.num_chunks) if self._record(c).exists()]

    def missing_chunks(self) -> list[int]:
        """Chunks still to compute."""
        return [c for c in range(self.num_chunks) if not self._record(c).exists()]

    @property
    def complete(self) -> bool:
        """Whether every chunk has been written."""
        return not self.missing_chunks()

    def write_chunk(self, chunk: int, rows: np.ndarray | torch.Tensor) -> None:
        """Write one chunk's rows, flush them to disk, then record the chunk as complete."""
        start, stop = self.chunk_bounds(chunk)
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        rows = np.asarray(rows)
        if rows.shape != (stop - start, self.shape[1]):
            raise ValueError(f"chunk {chunk} of {self.directory} needs rows of shape "
                             f"{(stop - start, self.shape[1])}, got {rows.shape}")
        if not np.isfinite(rows).all():
            bad = int(np.nonzero(~np.isfinite(rows).all(axis=1))[0][0]) + start
            raise ValueError(f"features for example {bad} are not finite; not storing chunk "
                             f"{chunk}")
        rows = np.ascontiguousarray(rows.astype(self.dtype, copy=False))
        array = self._open_array("r+")
        array[start:stop] = rows
        array.flush()
        del array
        atomic_write_json(self._record(chunk), {
            "chunk": chunk, "rows": [start, stop],
            "sum": float(rows.astype(np.float64).sum()),
            "sha256": hashlib.sha256(memoryview(rows)).hexdigest(),
        })
        self._reader = None
        self._verified = False

    def fill(self, compute: Callable[[int, int], np.ndarray | torch.Tensor], *,
             show_progress: bool = False, desc: str = "feature chunks") -> list[int]:
        """Compute and write every missing chunk with ``compute(start, stop)``; return them."""
        todo = self.missing_chunks()
        for chunk in progress(todo, enabled=show_progress, desc=desc, unit="chunk"):
            self.write_chunk(chunk, compute(*self.chunk_bounds(chunk)))
        return todo

    def _open_array(self, mode: str) -> np.memmap:
        """``features.npy`` as a memory map; a truncated or unreadable one, or one of another
        shape or dtype, raises :class:`DamagedFileError`."""
        path = self.directory / ARRAY_NAME
        try:
            array = np.load(path, mmap_mode=mode)
        except (ValueError, EOFError, OSError) as exc:
            raise DamagedFileError(path, f"not a readable array: {exc}", _REBUILD) from None
        if array.shape != self.shape or array.dtype != self.dtype:
            raise DamagedFileError(path, f"holds {array.dtype} {list(array.shape)}, the manifest "
                                   f"says {self.dtype} {list(self.shape)}", _REBUILD)
        return array

    def _chunk_problem(self, chunk: int, array: np.ndarray) -> str | None:
        """Why a completed chunk does not match its record, or None when it does."""
        try:
            record = read_json(self._record(chunk))
        except DamagedFileError as err:
            return f"its record {err.path.name} is damaged"
        start, stop = self.chunk_bounds(chunk)
        if record.get("rows") != [start, stop]:
            return f"its record names rows {record.get('rows')}, expected {[start, stop]}"
        rows = self._read_rows(array, start, stop)
        if "sha256" in record:  # stores written before checksums were recorded have only a sum
            if hashlib.sha256(memoryview(rows)).hexdigest() != record["sha256"]:
                return "its rows do not match their SHA-256 record"
            return None
        total = float(rows.astype(np.float64).sum())
        if not np.isclose(total, record["sum"], rtol=1e-6, atol=1e-6):
            return f"its rows sum to {total}, the record says {record['sum']}"
        return None

    def _read_rows(self, array: np.memmap, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` read from the file, not through the memory map: checking every
        chunk then leaves no mapped pages behind (resident memory stays one chunk)."""
        if not array.flags.c_contiguous:
            return np.ascontiguousarray(array[start:stop])
        width = self.shape[1]
        with open(self.directory / ARRAY_NAME, "rb") as f:
            rows = np.fromfile(f, dtype=self.dtype, count=(stop - start) * width,
                               offset=array.offset + start * width * self.dtype.itemsize)
        return rows.reshape(stop - start, width)

    def damaged_chunks(self) -> list[int]:
        """Completed chunks whose rows or record do not verify."""
        array = self._open_array("r")
        return [c for c in self.completed_chunks() if self._chunk_problem(c, array) is not None]

    def verify(self) -> None:
        """Check ``features.npy`` and every completed chunk against its record; raise
        :class:`DamagedFileError` naming the first damaged chunk and the fix."""
        array = self._open_array("r")
        for chunk in self.completed_chunks():
            problem = self._chunk_problem(chunk, array)
            if problem is not None:
                raise DamagedFileError(self.directory / ARRAY_NAME,
                                       f"chunk {chunk} (rows {self.chunk_bounds(chunk)}): "
                                       f"{problem}", _REBUILD)
        self._verified = True

    # ------------------------------------------------------------------ reading
    def _array(self) -> np.memmap:
        if not self.complete:
            missing = self.missing_chunks()
            raise RuntimeError(
                f"feature store {self.directory} is incomplete ({len(missing)} of "
                f"{self.num_chunks} chunks missing, e.g. {missing[:5]}); finish it (rerun the "
                "build, which resumes) before reading"
            )
        if not self._verified:
            self.verify()
        if self._reader is None:
            self._reader = self._open_array("r")
        return self._reader

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        """Rows of the (complete) store, read lazily from the memory map."""
        return self._array()[index]

    def as_memmap(self) -> np.memmap:
        """The whole (complete) store as a read-only memory map."""
        return self._array()

    def to_tensor(self) -> torch.Tensor:
        """The whole store loaded into memory (small stores and tests only)."""
        return torch.from_numpy(np.array(self._array()))


def _allocate(directory: Path, dtype: str | np.dtype, shape: tuple[int, int]) -> None:
    """Allocate ``features.npy`` under a temporary name, then rename: a crash here leaves no
    array that could be mistaken for this store's."""
    fd, tmp = tempfile.mkstemp(prefix=f".{ARRAY_NAME}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype),
                                          shape=tuple(shape))
        array.flush()
        del array
        os.replace(tmp, directory / ARRAY_NAME)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_manifest(directory: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    diffs = []
    for key in wanted:
        if key == "identity":
            have, want = stored.get("identity", {}), wanted["identity"]
            diffs += [f"identity.{k}: stored {have.get(k)!r}, requested {want.get(k)!r}"
                      for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
        elif stored.get(key) != wanted[key]:
            diffs.append(f"{key}: stored {stored.get(key)!r}, requested {wanted[key]!r}")
    if diffs:
        raise StoreMismatch(
            f"{directory} holds features of a different request ({'; '.join(diffs)[:600]}). "
            "Use another directory, or delete this one to rebuild."
        )


def _on_disk(directory: str | Path) -> int:
    """Bytes a (partial) store in ``directory`` already holds on disk: the allocated part of
    ``features.npy`` (a sparse file grows as chunks are written) and the chunk records."""
    directory = Path(directory)
    records = directory / "chunks"
    held = sum(allocated_bytes(r) for r in records.iterdir()) if records.is_dir() else 0
    return allocated_bytes(directory / ARRAY_NAME) + held


def gradient_identity(task: Task, params: Params, data: ArrayDataset, *, target: str,
                      projector: Projector | None, seed: int, checkpoint: int | str) -> dict:
    """What identifies a store of per-example gradients: task, gradient target, seed,
    checkpoint, projection, and fingerprints of the data and the parameters."""
    names = sorted(params)
    return {
        "task": task.name, "output": task.output_name, "target": target, "seed": int(seed),
        "checkpoint": checkpoint,
        "projection": projector.describe() if projector is not None else None,
        "data_fingerprint": data.fingerprint(),
        "params_fingerprint": fingerprint_tensors(*(params[k] for k in names)),
        "n": len(data),
    }


def open_gradient_store(
    directory: str | Path, task: Task, params: Params, data: ArrayDataset, *,
    target: str = "loss", projector: Projector | None = None, seed: int = 0,
    checkpoint: int | str = "final", chunk_rows: int = 1024, check_fit: bool = True,
) -> FeatureStore:
    """The gradient store for this request at ``directory``: opened (and repaired) when it
    exists and matches, created otherwise, refused when it holds another request. Every
    builder (:func:`build_gradient_store`, :func:`tdatune.features.distributed
    .build_gradient_store_ray`) opens stores here, so they build and resume the same store.

    First (before the data's fingerprint, which may read every example of a stream) a store
    that the free disk cannot hold is refused (:class:`~tdatune.features.budget.DoesNotFit`)
    with the numbers and the fix; ``check_fit=False`` skips that."""
    width = projector.d if projector is not None else num_params(params)
    if check_fit:
        check_fits(estimate_featurization(len(data), width, grad_width=num_params(params),
                                          store_chunk_rows=chunk_rows),
                   directory=directory, check_memory=False,
                   already_on_disk=_on_disk(directory), what="a gradient store")
    identity = gradient_identity(task, params, data, target=target, projector=projector,
                                 seed=seed, checkpoint=checkpoint)
    return FeatureStore.open_or_create(directory, shape=(len(data), width), identity=identity,
                                       dtype="float32", chunk_rows=chunk_rows)


def gradient_rows(task: Task, model: nn.Module, params: Params, data: ArrayDataset,
                  start: int, stop: int, *, target: str = "loss",
                  projector: Projector | None = None, grad_chunk_size: int = 256
                  ) -> torch.Tensor:
    """Rows ``start:stop`` of a gradient store: the per-example gradients (projected when
    ``projector`` is given) of ``data[start:stop]``."""
    return per_example_grads(task, model, params, data.slice(start, stop), target=target,
                             chunk_size=min(grad_chunk_size, stop - start), projector=projector)


def build_gradient_store(
    directory: str | Path, task: Task, model: nn.Module, params: Params, data: ArrayDataset, *,
    target: str = "loss", projector: Projector | None = None, seed: int = 0,
    checkpoint: int | str = "final", chunk_rows: int = 1024, grad_chunk_size: int = 256,
    show_progress: bool = False, check_fit: bool = True,
) -> FeatureStore:
    """Per-example gradients (projected by ``projector`` if given) of ``data`` in a store at
    ``directory``, computed chunk by chunk; resumes a partial store and refuses a different
    one. ``seed`` and ``checkpoint`` label which training run and epoch ``params`` are.

    ``data`` may be an ``ArrayDataset`` or a :class:`~tdatune.data.streaming.StreamingDataset`
    (read and collated one gradient chunk at a time). Before any work the memory (one chunk of
    gradients, the projection, one chunk of store rows) and the disk are estimated
    (:mod:`tdatune.features.budget`) and a run that would not fit is refused with the fix
    (:class:`~tdatune.features.budget.DoesNotFit`); ``check_fit=False`` skips that."""
    if check_fit:
        estimate = estimate_gradients(params, len(data), projector=projector,
                                      chunk_size=grad_chunk_size, store_chunk_rows=chunk_rows)
        check_fits(estimate, directory=directory, already_on_disk=_on_disk(directory),
                   what="build_gradient_store")
    store = open_gradient_store(directory, task, params, data, target=target,
                                projector=projector, seed=seed, checkpoint=checkpoint,
                                chunk_rows=chunk_rows, check_fit=False)

    def compute(start: int, stop: int) -> torch.Tensor:
        return gradient_rows(task, model, params, data, start, stop, target=target,
                             projector=projector, grad_chunk_size=grad_chunk_size)

    store.fill(compute, show_progress=show_progress, desc=f"{target} gradients -> store")
    return store


__all__ = ["FeatureStore", "StoreMismatch", "build_gradient_store", "gradient_identity",
           "gradient_rows", "open_gradient_store"]
