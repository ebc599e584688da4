"""LDS ground truth: M random subsets of fraction alpha, each retrained for real (optionally
with several seeds), the model outputs on the explained examples stored on disk.

Layout of a ground-truth directory::

    manifest.json          configuration + fingerprints of task, recipe and data
    masks.npy              [M, n] bool subset membership
    models/m0007_s1.npy    outputs [m_explained] of subset 7, seed 1 (one file per model)
    outputs.npy            [M, S, m] all outputs, written once every model is done

Every file is written atomically, so a killed run resumes with exactly the models that
finished; a directory built for another configuration is refused.

Models are retrained by a pluggable runner (``backend``): ``auto`` (the default) trains chunks
of models together with stacked parameters where that reproduces one-at-a-time training step
for step (SGD/Adam recipes, models without BatchNorm or dropout; see
:mod:`tdatune.models.batched`) and one at a time otherwise; ``batched`` also serves L-BFGS
recipes (the same unique minimiser to float32 precision, several times faster); ``process``
and ``ray`` spread the work over a local process pool or a Ray cluster (see
:mod:`tdatune.evaluate.runners`). Every backend hands finished models to the same atomic
writer, so any backend can resume any other's partial run. The backend is recorded in
``backend.json``, not in the manifest, since backends agree to float tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdatune.data.base import ArrayDataset
from tdatune.models.identity import refuse_older_format, task_identity
from tdatune.models.task import Task, callable_name, check_task
from tdatune.models.training import TrainFunction, TrainRecipe, load_model, train_model
from tdatune.utils.atomic import (
    atomic_save_npy,
    atomic_write_json,
    is_intact,
    keep_or_discard,
    load_npy_verified,
    read_json,
)
from tdatune.utils.checks import check_open_unit
from tdatune.utils.environment import numeric_environment
from tdatune.utils.fingerprint import differences, fingerprint_config, fingerprint_tensors
from tdatune.utils.progress import progress

_RERUN = ("rerun build_ground_truth (or `tdatune groundtruth`) with the same arguments: it "
          "recomputes a damaged masks.npy, outputs.npy or model file")
_MANIFEST_FIX = ("the manifest identifies what the stored models were trained for, so it cannot "
                 "be recomputed: delete the whole ground-truth directory and rebuild it")


@dataclass(frozen=True)
class GroundTruthConfig:
    """How subsets are drawn and models retrained."""

    n_subsets: int = 50
    alpha: float = 0.5
    seeds_per_subset: int = 1
    subset_seed: int = 0
    train_seed: int = 0

    def __post_init__(self) -> None:
        check_open_unit("subset fraction alpha", self.alpha)
        if self.n_subsets < 2:
            raise ValueError(f"n_subsets must be >= 2 (Spearman needs two points), got {self.n_subsets}")
        if self.seeds_per_subset < 1:
            raise ValueError(f"seeds_per_subset must be >= 1, got {self.seeds_per_subset}")

    def model_seed(self, subset: int, replicate: int) -> int:
        """The training seed of one retrained model."""
        return self.train_seed + 10_000 * replicate + subset

    def identity(self) -> dict[str, Any]:
        """The configuration as the manifest records it."""
        return asdict(self)


@dataclass(frozen=True)
class PairedSeeds(GroundTruthConfig):
    """Every subset trained with the same seeds (replicate r: ``train_seed + 10,000 r``), for
    comparisons between given subsets (removal experiments): a set gets the same models
    whatever is retrained beside it, and two sets compared share their initialisations."""

    def model_seed(self, subset: int, replicate: int) -> int:
        """The training seed of one retrained model: the same for every subset."""
        return self.train_seed + 10_000 * replicate

    def identity(self) -> dict[str, Any]:
        """The configuration as the manifest records it, with the seeding named."""
        return {**asdict(self), "seeding": "paired"}


@dataclass(frozen=True)
class RetrainJob:
    """One model to retrain: subset index, replicate index and its training seed."""

    subset: int
    replicate: int
    seed: int

    @property
    def filename(self) -> str:
        """Per-model output file name."""
        return f"m{self.subset:04d}_s{self.replicate}.npy"


@dataclass
class GroundTruth:
    """Stored ground truth: masks [M, n], outputs [M, S, m] and the configuration."""

    masks: torch.Tensor
    outputs: np.ndarray
    config: GroundTruthConfig
    directory: Path

    @property
    def mean_outputs(self) -> np.ndarray:
        """Outputs averaged over seeds: [M, m]."""
        return self.outputs.mean(axis=1)


def sample_subsets(n: int, config: GroundTruthConfig) -> torch.Tensor:
    """M boolean masks over n examples, each with round(alpha * n) members, from the seed."""
    size = round(config.alpha * n)
    if not 1 <= size < n:
        raise ValueError(f"alpha={config.alpha} of n={n} gives subsets of {size}; need 1..{n - 1}")
    gen = torch.Generator().manual_seed(config.subset_seed)
    masks = torch.zeros(config.n_subsets, n, dtype=torch.bool)
    for m in range(config.n_subsets):
        masks[m, torch.randperm(n, generator=gen)[:size]] = True
    return masks


def retrain_outputs(task: Task, recipe: TrainRecipe | TrainFunction, train: ArrayDataset,
                    explained: ArrayDataset, mask: torch.Tensor, seed: int,
                    device: str | torch.device = "cpu") -> np.ndarray:
    """Train on the masked subset with ``seed`` (the recipe, or your training function) and
    return the outputs on ``explained``."""
    if isinstance(recipe, TrainFunction):
        result = recipe.run(task, train, seed, index=mask)
    else:
        # check=False: build_ground_truth checked the task once before any retraining
        result = train_model(task, train.subset(mask), recipe, seed, device=device, check=False)
    model, params = load_model(task, result.state, device)
    on_device = explained.to(device)
    out = task.evaluate(model, params, on_device.inputs, on_device.targets)
    return out.double().cpu().numpy()


# A runner takes the pending jobs and a callback, and calls the callback once per finished
# model with (job, outputs). The local sequential runner is the default; others (process pool,
# Ray, batched) plug in with the same signature.
Runner = Callable[[Sequence[RetrainJob], Callable[[RetrainJob, np.ndarray], None]], None]


def sequential_runner(task: Task, recipe: TrainRecipe | TrainFunction, train: ArrayDataset,
                      explained: ArrayDataset, masks: torch.Tensor, device: str | torch.device,
                      show_progress: bool) -> Runner:
    """Retrain one model at a time in this process."""
    def run(jobs: Sequence[RetrainJob], done: Callable[[RetrainJob, np.ndarray], None]) -> None:
        for job in progress(jobs, enabled=show_progress, desc="retraining", unit="model"):
            done(job, retrain_outputs(task, recipe, train, explained, masks[job.subset], job.seed, device))
    return run


GT_FORMAT = 2  # 2: the task identity holds every Task field and the model's architecture


def manifest_for(task: Task, recipe: TrainRecipe | TrainFunction, train: ArrayDataset,
                 explained: ArrayDataset, config: GroundTruthConfig) -> dict[str, Any]:
    """What identifies a ground truth: format, configuration, recipe (or training function and
    its options), the task's every field with the model's architecture, and the training and
    explained data (fingerprints of their contents)."""
    return {
        "format": GT_FORMAT,
        "config": config.identity(),
        "recipe": recipe.to_dict(),
        "task": task_identity(task),
        "train_fingerprint": train.fingerprint(),
        "explained_fingerprint": explained.fingerprint(),
        "n_train": len(train),
        "n_explained": len(explained),
    }


def check_uses_indices(task: Task, function: TrainFunction, train: ArrayDataset, seed: int) -> None:
    """Refuse a training function whose trained state does not depend on the examples it is
    given (e.g. one that trains on everything): two small disjoint subsets, the same seed, must
    give different states. Cheap: two trainings on a few examples each."""
    n = len(train)
    k = max(1, min(8, n // 2))
    states = []
    for start in (0, k):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[start:start + k] = True
        states.append(function.run(task, train, seed, index=mask).state)
    if all(torch.equal(states[0][name], states[1][name]) for name in states[0]):
        name = function.name or callable_name(function.fn)
        given = "indices" if function.pass_indices else "data"
        raise ValueError(
            f"training function {name} returned the same trained state for two different "
            f"subsets of the training data (examples 0-{k - 1} and {k}-{2 * k - 1}, same seed "
            f"{seed}): it must train only on the {given} it is given (the `{given}` argument), "
            "not on the whole training set; a ground truth of models that all saw the same data "
            "would make every LDS meaningless")


def build_ground_truth(
    task: Task, recipe: TrainRecipe | TrainFunction, train: ArrayDataset, explained: ArrayDataset,
    config: GroundTruthConfig, directory: str | Path, *, device: str | torch.device = "cpu",
    runner: Runner | None = None, show_progress: bool = True, backend: str = "auto",
    backend_options: dict[str, Any] | None = None, masks: torch.Tensor | None = None,
) -> GroundTruth:
    """Build (or resume, or reuse) the ground truth in ``directory``.

    ``masks`` [n_subsets, n] (boolean) are the subsets to retrain on instead of the sampled
    ones (removal and leave-one-out experiments); they are part of the manifest.

    ``backend`` names how models are retrained (auto, sequential, batched, process, ray; see
    :func:`tdatune.evaluate.runners.make_runner`, which takes ``backend_options``); a ready
    ``runner`` callable overrides it. ``recipe`` may be a :class:`TrainFunction` (your own
    training loop: ``fn(subset, seed) -> trained state``); the sequential, process and Ray
    backends run it, with the same per-model files, resume and manifest checks.
    """
    directory = Path(directory)
    manifest = manifest_for(task, recipe, train, explained, config)
    if masks is not None:
        masks = torch.as_tensor(masks, dtype=torch.bool)
        if tuple(masks.shape) != (config.n_subsets, len(train)):
            raise ValueError(f"given subset masks must be [{config.n_subsets}, {len(train)}] "
                             f"(n_subsets x training examples), got {list(masks.shape)}")
        manifest["masks_fingerprint"] = fingerprint_tensors(masks)
    manifest["fingerprint"] = fingerprint_config(manifest)
    _make_folder(directory)
    _check_or_write_manifest(directory, manifest)
    masks_path = directory / "masks.npy"
    if masks is not None:
        if not is_intact(masks_path):
            atomic_save_npy(masks_path, masks.numpy())
    elif keep_or_discard(masks_path, "the subset masks from their seed"):
        masks = torch.from_numpy(load_npy_verified(masks_path))
    else:
        masks = sample_subsets(len(train), config)
        atomic_save_npy(masks_path, masks.numpy())
    outputs_path = directory / "outputs.npy"
    if keep_or_discard(outputs_path, "it from the per-model files in models/"):
        return GroundTruth(masks, load_npy_verified(outputs_path), config, directory)

    models_dir = directory / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    jobs = [RetrainJob(m, s, config.model_seed(m, s))
            for m in range(config.n_subsets) for s in range(config.seeds_per_subset)]
    pending = [j for j in jobs if not keep_or_discard(models_dir / j.filename,
                                                      f"model {j.filename} by retraining it")]

    def done(job: RetrainJob, out: np.ndarray) -> None:
        if out.shape != (len(explained),) or not np.isfinite(out).all():
            raise FloatingPointError(
                f"retrained model {job.filename} gave outputs of shape {out.shape} with "
                f"non-finite values: {not np.isfinite(out).all()}"
            )
        atomic_save_npy(models_dir / job.filename, out)

    if pending:
        # Cheap checks before any retraining: the model takes the batches, loss and output
        # give one value per example.
        check_task(task, train, what="training data")
        check_task(task, explained, what="explained examples")
        checked = directory / "train_function_check.json"
        if isinstance(recipe, TrainFunction) and not is_intact(checked):
            check_uses_indices(task, recipe, train, config.train_seed)
            atomic_write_json(checked, {"train_function": recipe.to_dict()["train_function"],
                                        "depends_on_its_data": True})
        run = runner
        if run is None:
            from tdatune.evaluate.runners import make_runner, resolve_backend

            backend = resolve_backend(backend, task, recipe, train)
            options = dict(backend_options or {})
            if backend == "batched":  # the chunk in flight saves its state beside the models
                options.setdefault("state_dir", models_dir)
            run = make_runner(backend, task, recipe, train, explained, masks, device=device,
                              show_progress=show_progress, **options)
            atomic_write_json(directory / "backend.json", {
                "backend": backend, "options": {k: repr(v) for k, v in
                                                (backend_options or {}).items()},
                "device": str(device), "pending_models": len(pending),
                "environment": numeric_environment(device),
            })
        run(pending, done)
    outputs = np.stack([
        np.stack([load_npy_verified(models_dir / RetrainJob(m, s, 0).filename, _RERUN)
                  for s in range(config.seeds_per_subset)])
        for m in range(config.n_subsets)
    ])
    atomic_save_npy(outputs_path, outputs)
    return GroundTruth(masks, outputs, config, directory)


def load_ground_truth(directory: str | Path) -> GroundTruth:
    """Read a finished ground truth from ``directory``."""
    directory = Path(directory)
    outputs_path = directory / "outputs.npy"
    if not outputs_path.exists():
        raise FileNotFoundError(
            f"{directory} holds no finished ground truth (no outputs.npy); build it first or "
            "rerun build_ground_truth to resume"
        )
    manifest = read_json(directory / "manifest.json", _MANIFEST_FIX)
    config = dict(manifest["config"])
    kind = PairedSeeds if config.pop("seeding", None) == "paired" else GroundTruthConfig
    return GroundTruth(torch.from_numpy(load_npy_verified(directory / "masks.npy", _RERUN)),
                       load_npy_verified(outputs_path, _RERUN), kind(**config), directory)


def _make_folder(directory: Path) -> None:
    """Create the ground-truth folder (and its parents), or refuse naming the folder, what
    stands in the way (a file where a folder should be) and the fix."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (directory, *directory.parents)
                        if p.exists() and not p.is_dir()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None
               else exc.strerror or str(exc))
        raise type(exc)(
            f"cannot create the ground-truth folder {directory}: {why}. Fix: pass a folder "
            "path whose parents are folders you can write to (or move the file out of the way)"
        ) from exc


def _check_or_write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Accept a manifest of the same ground truth, refuse one of an older format (with the
    command to rebuild) or of another ground truth (naming the fields that differ)."""
    path = directory / "manifest.json"
    if path.exists():
        stored = read_json(path, _MANIFEST_FIX)
        if stored.get("fingerprint") == manifest["fingerprint"]:
            return
        refuse_older_format(stored, manifest, directory, "ground truth", "retrain it")
        diffs = differences({k: v for k, v in stored.items() if k != "fingerprint"},
                            {k: v for k, v in manifest.items() if k != "fingerprint"})
        top = dict.fromkeys(d.split(".")[0] for d in diffs)
        raise ValueError(
            f"{directory} holds ground truth for a different configuration (differs in: "
            f"{', '.join(diffs) or 'fingerprint'}); stored: "
            f"{json.dumps({k: stored.get(k) for k in top}, default=str)[:400]}. "
            "Use another directory, or delete this one to rebuild."
        )
    atomic_write_json(path, manifest)
