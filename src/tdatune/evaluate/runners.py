"""Ways to run the retraining jobs of a ground truth, all behind the ``Runner`` signature.

A runner takes the pending jobs and a ``done(job, outputs)`` callback and calls it once per
finished model, in this (the driver) process. ``done`` writes the model's file atomically, so
every runner resumes the same way: a killed run keeps exactly the models that finished.

* ``sequential``: one model at a time in this process.
* ``batched``: chunks of models trained together with stacked parameters
  (:mod:`tdatune.models.batched`); chunk size bounded by memory; several models at once on a
  GPU.
* ``process``: a local process pool (spawn), one model (or one batched chunk) per task.
* ``ray``: the same tasks submitted to a Ray cluster (``address``) or a local Ray instance.

:func:`map_local` and :func:`map_ray` run any picklable function over independent items
(sweep cells) with the same two backends.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from tdatune.data.base import ArrayDataset
from tdatune.evaluate.groundtruth import RetrainJob, Runner, retrain_outputs, sequential_runner
from tdatune.models.batched import (
    ChunkCheckpoints,
    ChunkPlanner,
    check_batchable,
    models_per_chunk,
    retrain_outputs_batched,
    supports_batched,
)
from tdatune.models.task import Task
from tdatune.models.training import TrainFunction, TrainRecipe
from tdatune.utils.checks import check_choice
from tdatune.utils.progress import progress
from tdatune.utils.raycluster import RayConnection

RUNNERS = ("auto", "sequential", "batched", "process", "ray")
GPU_WORKERS = 4  # default processes sharing one GPU in the process backend
T = TypeVar("T")
R = TypeVar("R")
Done = Callable[[RetrainJob, np.ndarray], None]


@dataclass(frozen=True)
class RetrainContext:
    """Everything a worker needs to retrain any job; picklable (the task's model factory is a
    module-level class or functools.partial) and sent to each worker once."""

    task: Task
    recipe: TrainRecipe | TrainFunction
    train: ArrayDataset
    explained: ArrayDataset
    masks: torch.Tensor
    device: str = "cpu"

    def run_chunk(self, jobs: Sequence[RetrainJob], batched: bool,
                  state_path: Path | None = None) -> list[np.ndarray]:
        """Outputs of each job's model, trained together when ``batched`` and more than one
        (saving the chunk's in-flight state to ``state_path`` about once a minute)."""
        if batched and len(jobs) > 1 and isinstance(self.recipe, TrainRecipe):
            index = torch.tensor([j.subset for j in jobs])
            out = retrain_outputs_batched(self.task, self.recipe, self.train, self.explained,
                                          self.masks[index], [j.seed for j in jobs],
                                          device=self.device, state_path=state_path)
            return list(out)
        return [retrain_outputs(self.task, self.recipe, self.train, self.explained,
                                self.masks[j.subset], j.seed, self.device) for j in jobs]


def chunked(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive pieces of ``items`` with at most ``size`` each."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _drain_futures(futures: dict[Future[R], T], on_done: Callable[[T, R], None]) -> None:
    """Call ``on_done(key, result)`` as each future finishes; on any error (a failed task,
    an error in ``on_done``, Ctrl-C) cancel the futures not yet started and re-raise."""
    pending = set(futures)
    try:
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                on_done(futures[future], future.result())
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def _drain_ray(ray: Any, refs: dict[Any, T], on_done: Callable[[T, Any], None]) -> None:
    """Call ``on_done(key, result)`` as each Ray task finishes; on any error cancel the
    tasks still pending and re-raise."""
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            on_done(refs[ready[0]], ray.get(ready[0]))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _chunk_writer(done: Done, bar: Any) -> Callable[[list[RetrainJob], list[np.ndarray]], None]:
    """The callback that hands a finished chunk's models to ``done`` and ticks the bar."""
    def finished(chunk: list[RetrainJob], outs: list[np.ndarray]) -> None:
        for job, out in zip(chunk, outs, strict=True):
            done(job, np.asarray(out))
        bar.update(len(chunk))
    return finished


def _result_collector(results: list[Any], on_result: Callable[[int, Any], None] | None,
                      bar: Any) -> Callable[[int, Any], None]:
    """The callback that stores item ``index``'s result, reports it and ticks the bar."""
    def finished(index: int, result: Any) -> None:
        results[index] = result
        if on_result is not None:
            on_result(index, result)
        bar.update(1)
    return finished


def batched_runner(task: Task, recipe: TrainRecipe | TrainFunction, train: ArrayDataset,
                   explained: ArrayDataset,
                   masks: torch.Tensor, device: str | torch.device = "cpu",
                   show_progress: bool = True, *, chunk_size: int | None = None,
                   memory_bytes: int | None = None, state_dir: str | Path | None = None
                   ) -> Runner:
    """Train chunks of models together in this process: ``chunk_size`` models each, or by
    default as many as fit in ``memory_bytes`` (:func:`tdatune.models.batched.models_per_chunk`);
    each chunk's models are stored as soon as it finishes. A kill loses at most about a minute
    of work: with ``state_dir`` (SGD / Adam recipes; the ground truth passes its ``models/``)
    the chunk in flight saves its state there about once a minute and a rerun resumes it
    (:class:`tdatune.models.batched.ChunkCheckpoints`); otherwise chunks are kept to about a
    minute of work (:class:`tdatune.models.batched.ChunkPlanner`)."""
    check_batchable(task)
    if not can_batch(task, recipe, train):
        raise ValueError(
            f"{task.name}: the batched backend needs a TrainRecipe, a model called as model(x) "
            "and tensor inputs and targets; a training function, a custom forward or "
            f"structured batches ({train.describe()}) retrain with the sequential, process or "
            "ray backend")
    ctx = RetrainContext(task, recipe, train, explained, masks, str(device))
    subset_size = int(masks[0].sum()) if len(masks) else None

    def run(jobs: Sequence[RetrainJob], done: Done) -> None:
        size = chunk_size or models_per_chunk(task, recipe, train, device=device,
                                              memory_bytes=memory_bytes, subset_size=subset_size)
        with progress(total=len(jobs), enabled=show_progress, desc="retraining (batched)",
                      unit="model") as bar:
            write = _chunk_writer(done, bar)
            if state_dir is not None and getattr(recipe, "optimizer", None) != "lbfgs":
                saved = ChunkCheckpoints(state_dir)
                for chunk in saved.chunks(jobs, size, lambda j: [j.subset, j.replicate, j.seed]):
                    write(chunk, ctx.run_chunk(chunk, batched=True, state_path=saved.state_path))
                return
            # Without saved state: chunks that bound what a kill loses (ChunkPlanner); an
            # explicit chunk_size is taken as given.
            chunks = (chunked(jobs, min(size, max(len(jobs), 1))) if chunk_size
                      else ChunkPlanner(size).chunks(jobs))
            for chunk in chunks:
                write(chunk, ctx.run_chunk(chunk, batched=True))
    return run


# ---------------------------------------------------------------- local process pool

_WORKER_CONTEXT: RetrainContext | None = None


def _init_worker(ctx: RetrainContext | None, threads: int) -> None:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = ctx
    torch.set_num_threads(threads)
    os.environ.setdefault("TDATUNE_NO_PROGRESS", "1")


def _worker_chunk(jobs: list[RetrainJob], batched: bool) -> list[np.ndarray]:
    if _WORKER_CONTEXT is None:
        raise RuntimeError("retraining worker started without its context")
    return _WORKER_CONTEXT.run_chunk(jobs, batched)


def default_workers(num_workers: int | None, tasks: int) -> int:
    """``num_workers`` or the CPU count, never more than there are tasks."""
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {workers}")
    return max(1, min(workers, tasks))


def _threads_per_worker(workers: int, threads: int | None) -> int:
    return threads if threads is not None else max(1, (os.cpu_count() or 1) // workers)


def process_runner(task: Task, recipe: TrainRecipe | TrainFunction, train: ArrayDataset,
                   explained: ArrayDataset,
                   masks: torch.Tensor, device: str | torch.device = "cpu",
                   show_progress: bool = True, *, num_workers: int | None = None,
                   threads_per_worker: int | None = None, models_per_task: int = 1) -> Runner:
    """Retrain in a pool of spawned processes; ``models_per_task > 1`` trains each task's
    models batched (when the model supports it). Workers default to the CPU count, or on a GPU
    to as many concurrent models as fit its free memory (at most ``GPU_WORKERS``); this is how
    models the batched path refuses (BatchNorm, dropout) share one GPU. Torch threads per
    worker default to the CPU count divided by the workers, so the pool does not
    oversubscribe the cores."""
    ctx = RetrainContext(task, recipe, train, explained, masks, str(device))
    batched = models_per_task > 1 and can_batch(task, recipe, train)

    def run(jobs: Sequence[RetrainJob], done: Done) -> None:
        chunks = chunked(jobs, models_per_task)
        wanted = num_workers
        if wanted is None and torch.device(device).type == "cuda" and \
                can_batch(task, recipe, train):
            # Several models at once on one GPU, as many as fit (at most GPU_WORKERS).
            fit = models_per_chunk(task, recipe, train, device=device) // max(models_per_task, 1)
            wanted = max(1, min(GPU_WORKERS, fit))
        workers = default_workers(wanted, len(chunks))
        threads = _threads_per_worker(workers, threads_per_worker)
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                 initializer=_init_worker, initargs=(ctx, threads)) as pool, \
                progress(total=len(jobs), enabled=show_progress,
                         desc=f"retraining ({workers} processes)", unit="model") as bar:
            _drain_futures({pool.submit(_worker_chunk, chunk, batched): chunk
                            for chunk in chunks}, _chunk_writer(done, bar))
    return run


# ---------------------------------------------------------------- Ray

def _ray_chunk(ctx: RetrainContext, jobs: list[RetrainJob], batched: bool,
               threads: int) -> list[np.ndarray]:
    torch.set_num_threads(threads)
    os.environ.setdefault("TDATUNE_NO_PROGRESS", "1")
    return ctx.run_chunk(jobs, batched)


def ray_runner(task: Task, recipe: TrainRecipe | TrainFunction, train: ArrayDataset,
               explained: ArrayDataset,
               masks: torch.Tensor, device: str | torch.device = "cpu",
               show_progress: bool = True, *, address: str | None = None,
               num_cpus_per_task: int = 1, num_gpus_per_task: float = 0,
               models_per_task: int = 1, init_options: dict[str, Any] | None = None) -> Runner:
    """Submit retraining tasks (``models_per_task`` models each, batched when supported) to
    Ray at ``address`` (None: the running instance, or a new local one). The context is put in
    the object store once; outputs come back to this driver, which writes them with ``done``.
    Workers must be able to import tdatune (install it on every node of a cluster)."""
    ctx = RetrainContext(task, recipe, train, explained, masks, str(device))
    batched = models_per_task > 1 and can_batch(task, recipe, train)

    def run(jobs: Sequence[RetrainJob], done: Done) -> None:
        with RayConnection(address, init_options=init_options, what="the ray backend") as ray:
            remote = ray.remote(num_cpus=num_cpus_per_task, num_gpus=num_gpus_per_task)(_ray_chunk)
            ctx_ref = ray.put(ctx)
            refs = {remote.remote(ctx_ref, chunk, batched, max(1, int(num_cpus_per_task))): chunk
                    for chunk in chunked(jobs, models_per_task)}
            with progress(total=len(jobs), enabled=show_progress, desc="retraining (ray)",
                          unit="model") as bar:
                _drain_ray(ray, refs, _chunk_writer(done, bar))
    return run


# ---------------------------------------------------------------- factory

def make_runner(name: str, task: Task, recipe: TrainRecipe | TrainFunction, train: ArrayDataset,
                explained: ArrayDataset, masks: torch.Tensor, *,
                device: str | torch.device = "cpu", show_progress: bool = True,
                **options: Any) -> Runner:
    """The runner called ``name`` (auto, sequential, batched, process, ray) with its options.

    ``auto`` is ``batched`` when batched training reproduces ``train_model`` step for step
    (a minibatch SGD/Adam recipe and a model without BatchNorm, dropout or buffers) and
    ``sequential`` otherwise (see :func:`resolve_backend`); ``batched`` refuses unsupported
    models with a message naming the module. Options: batched — chunk_size, memory_bytes, state_dir;
    process — num_workers, threads_per_worker, models_per_task; ray — address,
    num_cpus_per_task, num_gpus_per_task, models_per_task, init_options.
    """
    name = resolve_backend(name, task, recipe, train)
    factories: dict[str, Callable[..., Runner]] = {
        "sequential": sequential_runner, "batched": batched_runner,
        "process": process_runner, "ray": ray_runner,
    }
    factory = factories[name]
    if name == "sequential" and options:
        raise TypeError(f"the sequential backend takes no options, got {sorted(options)}")
    try:
        return factory(task, recipe, train, explained, masks, device, show_progress, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TypeError(f"bad option for the {name} backend: {exc}; see make_runner's "
                            "docstring for each backend's options") from exc
        raise


def can_batch(task: Task, recipe: TrainRecipe | TrainFunction | None,
              train: ArrayDataset | None = None) -> bool:
    """Whether batched retraining serves this task, recipe and data: a TrainRecipe (not your
    own training function), ``model(x)`` on tensor inputs and targets, a supported model."""
    if isinstance(recipe, TrainFunction) or not task.plain:
        return False
    if train is not None and not train.is_tensor_pair:
        return False
    return supports_batched(task)


def resolve_backend(name: str, task: Task, recipe: TrainRecipe | TrainFunction | None = None,
                    train: ArrayDataset | None = None) -> str:
    """The concrete backend ``auto`` stands for with this task and recipe; others unchanged.

    ``auto`` picks ``batched`` only where it reproduces ``train_model`` step for step: SGD or
    Adam recipes on models it supports. For L-BFGS recipes batched training reaches the same
    minimiser only to float32 precision (about 1e-3 in parameters), not ``train_model``'s
    exact iterate, so ``auto`` keeps those ``sequential`` and ``batched`` is opt-in (it is
    several times faster; see docs/performance.md).
    """
    check_choice("ground-truth backend", name, RUNNERS)
    if name == "auto":
        minibatch = recipe is None or recipe.optimizer != "lbfgs"
        return "batched" if minibatch and can_batch(task, recipe, train) else "sequential"
    return name


# ---------------------------------------------------------------- generic maps (sweep cells)

def _call_with_threads(fn: Callable[[T], R], item: T, threads: int) -> R:
    torch.set_num_threads(threads)
    return fn(item)


def map_local(fn: Callable[[T], R], items: Iterable[T], *, num_workers: int | None = None,
              threads_per_worker: int | None = None, show_progress: bool = False,
              desc: str = "cells", on_result: Callable[[int, R], None] | None = None) -> list[R]:
    """``[fn(item) for item in items]`` in a spawned process pool, results in input order.

    ``fn`` and the items must be picklable (``fn`` a module-level function or a
    functools.partial of one). ``num_workers=0`` runs inline in this process.
    ``on_result(index, result)`` is called in this process as each item finishes (to write
    it at once, so an interrupted map keeps what finished).
    """
    items = list(items)
    if num_workers == 0:
        inline = []
        for i, item in enumerate(progress(items, enabled=show_progress, desc=desc)):
            inline.append(fn(item))
            if on_result is not None:
                on_result(i, inline[-1])
        return inline
    workers = default_workers(num_workers, len(items))
    threads = _threads_per_worker(workers, threads_per_worker)
    results: list[Any] = [None] * len(items)
    if not items:
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                             initializer=_init_worker, initargs=(None, threads)) as pool, \
            progress(total=len(items), enabled=show_progress, desc=desc) as bar:
        _drain_futures({pool.submit(_call_with_threads, fn, item, threads): i
                        for i, item in enumerate(items)}, _result_collector(results, on_result, bar))
    return results


def map_ray(fn: Callable[[T], R], items: Iterable[T], *, address: str | None = None,
            num_cpus: float = 1, num_gpus: float = 0, show_progress: bool = False,
            desc: str = "cells", init_options: dict[str, Any] | None = None,
            on_result: Callable[[int, R], None] | None = None) -> list[R]:
    """``[fn(item) for item in items]`` as Ray tasks (``num_cpus``/``num_gpus`` each) on the
    cluster at ``address`` (None: the running instance or a new local one), in input order.
    ``on_result(index, result)`` is called in this driver as each item finishes."""
    items = list(items)
    with RayConnection(address, init_options=init_options, what="the ray backend") as ray:
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_call_with_threads)
        threads = max(1, int(num_cpus))
        refs = {remote.remote(fn, item, threads): i for i, item in enumerate(items)}
        results: list[Any] = [None] * len(items)
        with progress(total=len(items), enabled=show_progress, desc=desc) as bar:
            _drain_ray(ray, refs, _result_collector(results, on_result, bar))
    return results


__all__ = [
    "RUNNERS", "RetrainContext", "batched_runner", "can_batch", "chunked", "make_runner", "map_local",
    "map_ray", "process_runner", "ray_runner", "resolve_backend", "sequential_runner",
]
