"""Gradient stores featurized on Ray: chunks computed by Ray tasks, written by this driver.

:func:`build_gradient_store_ray` opens the same store as
:func:`tdatune.features.store.build_gradient_store` (same manifest and identity, through
:func:`~tdatune.features.store.open_gradient_store`), submits its missing chunks as Ray
tasks and writes each chunk with :meth:`~tdatune.features.store.FeatureStore.write_chunk`
as it comes back. Each task computes its rows with the same function as the one-process
build (:func:`~tdatune.features.store.gradient_rows`), so either builder resumes the
other's partial store, and a killed run keeps exactly the chunks it recorded.

What travels: the task and the model's state dict (parameters overlaid by ``params``) are
put in the object store once; each task carries a copy of its own rows of the data. A
worker rebuilds the model with ``task.make_model()`` and the projector from its description
(it is seeded), once per worker process.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tdatune.data.base import ArrayDataset
from tdatune.features.factored import KroneckerProjector
from tdatune.features.projection import Projector
from tdatune.features.store import FeatureStore, gradient_rows, open_gradient_store
from tdatune.models.task import Params, Task
from tdatune.utils.progress import progress
from tdatune.utils.raycluster import RayConnection

AnyProjector = Projector | KroneckerProjector | None


@dataclass(frozen=True)
class GradientJob:
    """What every chunk task shares (put in the Ray object store once): the task, the
    model's full state with ``params`` overlaid, which entries are differentiated (in
    order), the gradient target, the projector's description and the worker settings."""

    task: Task
    state: dict[str, torch.Tensor]
    param_names: tuple[str, ...]
    target: str
    projection: dict[str, Any] | None
    projection_dtype: torch.dtype
    grad_chunk_size: int
    device: str
    threads: int
    token: str

    def featurizer(self) -> tuple[nn.Module, Params, AnyProjector]:
        """The model, its differentiated parameters and the projector, rebuilt here."""
        model = self.task.make_model()
        try:
            model.load_state_dict(self.state, assign=True)  # keeps the driver's dtypes
        except RuntimeError as exc:
            raise RuntimeError(
                f"{self.task.name}: the Ray worker rebuilt the model with task.make_model() "
                "and it does not take the driver model's state dict; build the store from "
                f"the model task.make_model() returns ({exc})") from exc
        model.to(self.device)
        params = {k: self.state[k].to(self.device) for k in self.param_names}
        projector: Projector | KroneckerProjector | None = None
        if self.projection is not None and self.projection["kind"] == "kronecker":
            spec = self.projection
            projector = KroneckerProjector(model, params, int(spec["requested"]),
                                           seed=int(spec["seed"]))
            if projector.describe() != spec:
                raise RuntimeError(f"the worker's projection {projector.describe()} is not the "
                                   f"driver's {spec} (different tdatune versions?)")
        elif self.projection is not None:
            spec = self.projection
            projector = Projector(int(spec["p"]), int(spec["d"]), kind=str(spec["kind"]),
                                  seed=int(spec["seed"]), dtype=self.projection_dtype,
                                  device=self.device)
            if projector.describe() != spec:
                raise RuntimeError(f"the worker's projection {projector.describe()} is not the "
                                   f"driver's {spec} (different tdatune versions?)")
        return model, params, projector


_WORKER_CACHE: dict[str, tuple[nn.Module, Params, AnyProjector]] = {}


def _chunk_task(job: GradientJob, part: ArrayDataset) -> np.ndarray:
    """One chunk's rows on a Ray worker (the model and projector built once per process)."""
    torch.set_num_threads(job.threads)
    os.environ.setdefault("TDATUNE_NO_PROGRESS", "1")
    if job.token not in _WORKER_CACHE:
        _WORKER_CACHE.clear()
        _WORKER_CACHE[job.token] = job.featurizer()
    model, params, projector = _WORKER_CACHE[job.token]
    rows = gradient_rows(job.task, model, params, part, 0, len(part), target=job.target,
                         projector=projector, grad_chunk_size=job.grad_chunk_size)
    return rows.detach().cpu().numpy()


def _copy_rows(data: ArrayDataset, start: int, stop: int) -> ArrayDataset:
    """Rows ``start:stop`` as their own tensors (a pickled view would carry its whole
    storage, i.e. the whole dataset, to every task)."""
    return data.subset(torch.arange(start, stop))


def _drain_window(ray: Any, submit: Iterator[tuple[Any, int]], window: int,
                  on_done: Callable[[int, Any], None]) -> None:
    """Call ``on_done(chunk, rows)`` as tasks finish, keeping at most ``window`` submitted;
    on any error (a failed task, one in ``on_done``, Ctrl-C) cancel the tasks still pending
    and re-raise."""
    pending: dict[Any, int] = {}

    def collect() -> None:
        ready, _ = ray.wait(list(pending), num_returns=1)
        rows = ray.get(ready[0])
        on_done(pending.pop(ready[0]), rows)

    try:
        for ref, chunk in submit:
            pending[ref] = chunk
            if len(pending) >= window:
                collect()
        while pending:
            collect()
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def build_gradient_store_ray(
    directory: str | Path, task: Task, model: nn.Module, params: Params, data: ArrayDataset, *,
    target: str = "loss", projector: AnyProjector = None, seed: int = 0,
    checkpoint: int | str = "final", chunk_rows: int = 1024, grad_chunk_size: int = 256,
    show_progress: bool = False, address: str | None = None, num_workers: int | None = None,
    num_cpus_per_task: int = 1, num_gpus_per_task: float = 0,
    init_options: dict[str, Any] | None = None,
) -> FeatureStore:
    """:func:`~tdatune.features.store.build_gradient_store` with the chunks computed by Ray
    tasks: the same store (either builder resumes the other's), each chunk written by this
    driver as it arrives, only missing chunks submitted.

    ``address``: a Ray cluster (None: the running instance, or a new local one, shut down
    at the end). ``num_workers``: chunks in flight at once (default: the cluster's CPUs, or
    GPUs, over what one task takes; a new local instance gets ``num_workers *
    num_cpus_per_task`` CPUs). Each task runs ``num_cpus_per_task`` torch threads, on a GPU
    when ``num_gpus_per_task > 0``. ``init_options`` go to ``ray.init``. On a cluster every
    node must import tdatune and the module defining your task (install them, or pass
    ``init_options={"runtime_env": ...}``)."""
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if num_cpus_per_task < 1:
        raise ValueError(f"num_cpus_per_task must be >= 1, got {num_cpus_per_task}")
    store = open_gradient_store(directory, task, params, data, target=target,
                                projector=projector, seed=seed, checkpoint=checkpoint,
                                chunk_rows=chunk_rows)
    todo = store.missing_chunks()
    if not todo:
        return store
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state.update({k: v.detach().cpu() for k, v in params.items()})
    job = GradientJob(
        task=task, state=state, param_names=tuple(params), target=target,
        projection=projector.describe() if projector is not None else None,
        projection_dtype=getattr(projector, "dtype", torch.float32),
        grad_chunk_size=grad_chunk_size, device="cuda" if num_gpus_per_task > 0 else "cpu",
        threads=int(num_cpus_per_task), token=uuid.uuid4().hex)
    local_cpus = num_workers * num_cpus_per_task if num_workers is not None else None
    with RayConnection(address, local_cpus, init_options, what="featurizing on Ray") as ray:
        workers = num_workers or _cluster_slots(ray, num_cpus_per_task, num_gpus_per_task)
        remote = ray.remote(num_cpus=num_cpus_per_task, num_gpus=num_gpus_per_task)(_chunk_task)
        job_ref = ray.put(job)
        submit = ((remote.remote(job_ref, _copy_rows(data, *store.chunk_bounds(c))), c)
                  for c in todo)
        with progress(total=len(todo), enabled=show_progress, unit="chunk",
                      desc=f"{target} gradients -> store (ray)") as bar:

            def write(chunk: int, rows: np.ndarray) -> None:
                store.write_chunk(chunk, rows)
                bar.update(1)

            _drain_window(ray, submit, max(1, min(workers, len(todo))), write)
    return store


def _cluster_slots(ray: Any, cpus: int, gpus: float) -> int:
    """How many tasks of ``cpus`` CPUs and ``gpus`` GPUs the cluster runs at once."""
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 1) // cpus)
    if gpus > 0:
        slots = min(slots, int(resources.get("GPU", 0) // gpus))
    return max(1, slots)


__all__ = ["GradientJob", "build_gradient_store_ray"]
