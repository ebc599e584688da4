"""Shared preparation of a setting for studies: train once (per-epoch checkpoints on disk),
build or reuse the LDS ground truth, and assemble the attribution context."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tdatune.attributors.base import AttributionContext
from tdatune.data.base import Splits
from tdatune.evaluate.groundtruth import GroundTruth, GroundTruthConfig, build_ground_truth
from tdatune.models.identity import task_identity
from tdatune.models.task import Task
from tdatune.models.training import (
    TrainFunction,
    TrainRecipe,
    TrainResult,
    check_checkpoint_dir,
    train_model,
)
from tdatune.settings.registry import Setting, get_setting
from tdatune.utils.device import resolve_device


def epoch_learning_rates(recipe: TrainRecipe | TrainFunction, n_train: int) -> list[float] | None:
    """The learning rate in force at the start of each epoch (TracIn's weights); 1 for L-BFGS;
    the given ones (or None) for a user's training function."""
    return recipe.epoch_learning_rates(n_train)


@dataclass
class TrainedSetting:
    """A trained setting without ground truth: data, task, recipe, checkpoints, context."""

    setting: Setting
    splits: Splits
    task: Task
    recipe: TrainRecipe
    trained: TrainResult
    context: AttributionContext
    _quality: dict[str, float] | None = field(default=None, init=False, repr=False)

    def quality(self) -> dict[str, float]:
        """The final model on the test split: accuracy (NaN for a non-classifier) and mean
        loss, so that a study says how good the model it explains is (computed once)."""
        if self._quality is None:
            model, params = self.context.model_at(-1)
            test = self.splits.test.to(self.context.device)
            loss = self.task.evaluate(model, params, test.inputs, test.targets, fn="loss")
            self._quality = {
                "test_accuracy": self.task.accuracy(model, params, test.inputs, test.targets),
                "test_loss": float(loss.double().mean())}
        return self._quality

    def test_accuracy(self) -> float:
        """Accuracy of the final model on the test split (NaN for a non-classifier)."""
        return self.quality()["test_accuracy"]


@dataclass
class Prepared(TrainedSetting):
    """A trained setting with its ground truth, ready for attribution."""

    groundtruth: GroundTruth | None = None


def build_setting(
    name: str, *, seed: int = 0, data_dir: str | None = None,
    sizes: tuple[int, int, int] | None = None, task_options: dict[str, Any] | None = None,
    load_options: dict[str, Any] | None = None,
) -> tuple[Setting, Splits, Task]:
    """The setting ``name`` with its data loaded and its task made (nothing trained)."""
    setting = get_setting(name)
    splits, task = setting.build(seed=seed, data_dir=data_dir, sizes=sizes,
                                 task_options=task_options, load_options=load_options)
    return setting, splits, task


def setting_identity(splits: Splits, task: Task, recipe: TrainRecipe | TrainFunction,
                     seed: int) -> dict[str, Any]:
    """Everything a trained setting's numbers depend on, read off the resolved objects: the
    task's every field with the model's architecture, the recipe or training function with its
    options, the seed and the contents of every split."""
    return {"task": task_identity(task), "recipe": recipe.to_dict(), "seed": seed,
            **{f"{part}_fingerprint": getattr(splits, part).fingerprint()
               for part in ("train", "val", "test")}}


def train_built(
    setting: Setting, splits: Splits, task: Task, directory: str | Path, *, seed: int = 0,
    device: str | torch.device | None = "auto", show_progress: bool = True,
    recipe_overrides: dict[str, Any] | None = None, say: Any = print,
) -> TrainedSetting:
    """Train a built setting into ``directory/checkpoints`` (resumed or reused when already
    there; a directory of another training run is refused naming what differs)."""
    from dataclasses import replace

    directory = Path(directory)
    dev = resolve_device(device)
    recipe = replace(setting.recipe, **(recipe_overrides or {}))
    checkpoints = directory / "checkpoints"
    check_checkpoint_dir(checkpoints, task, splits.train, recipe, seed)
    say(_training_message(setting.name, len(splits.train), splits.source, recipe, checkpoints))
    trained = train_model(task, splits.train, recipe, seed, device=dev,
                          checkpoint_dir=checkpoints, show_progress=show_progress)
    context = AttributionContext(
        task, splits.train, trained.checkpoints, weight_decay=recipe.weight_decay,
        learning_rates=epoch_learning_rates(recipe, len(splits.train)), device=dev,
        show_progress=show_progress,
    )
    return TrainedSetting(setting, splits, task, recipe, trained, context)


def train_setting(
    name: str, directory: str | Path, *, seed: int = 0, data_dir: str | None = None,
    sizes: tuple[int, int, int] | None = None, device: str | torch.device | None = "auto",
    show_progress: bool = True, recipe_overrides: dict[str, Any] | None = None, say: Any = print,
    task_options: dict[str, Any] | None = None, load_options: dict[str, Any] | None = None,
) -> TrainedSetting:
    """Build ``name`` (with model / data option overrides) and train it into
    ``directory/checkpoints`` (resumed or reused when already there)."""
    setting, splits, task = build_setting(name, seed=seed, data_dir=data_dir, sizes=sizes,
                                          task_options=task_options, load_options=load_options)
    return train_built(setting, splits, task, directory, seed=seed, device=device,
                       show_progress=show_progress, recipe_overrides=recipe_overrides, say=say)


def setting_groundtruth(
    trained: TrainedSetting, gt_config: GroundTruthConfig, directory: str | Path, *,
    show_progress: bool = True, say: Any = print, backend: str = "auto",
    backend_options: dict[str, Any] | None = None,
) -> GroundTruth:
    """Build (or resume, or reuse) the ground truth of a trained setting in ``directory``."""
    say(f"ground truth: {gt_config.n_subsets} subsets x {gt_config.seeds_per_subset} seed(s), "
        f"alpha={gt_config.alpha}, {len(trained.splits.test)} test examples")
    return build_ground_truth(trained.task, trained.recipe, trained.splits.train,
                              trained.splits.test, gt_config, directory,
                              device=trained.context.device, show_progress=show_progress,
                              backend=backend, backend_options=backend_options)


def prepare_setting(
    name: str, directory: str | Path, gt_config: GroundTruthConfig, *, seed: int = 0,
    data_dir: str | None = None, sizes: tuple[int, int, int] | None = None,
    device: str | torch.device | None = "auto", show_progress: bool = True,
    recipe_overrides: dict[str, Any] | None = None, say: Any = print,
    backend: str = "auto", backend_options: dict[str, Any] | None = None,
    task_options: dict[str, Any] | None = None, load_options: dict[str, Any] | None = None,
) -> Prepared:
    """Train ``name`` into ``directory/checkpoints`` and build ``directory/groundtruth``;
    both are reused (resumed) when already there. ``backend`` picks how subset models are
    retrained (auto, sequential, batched, process, ray; see ``evaluate.runners.make_runner``)."""
    directory = Path(directory)
    t = train_setting(name, directory, seed=seed, data_dir=data_dir, sizes=sizes, device=device,
                      show_progress=show_progress, recipe_overrides=recipe_overrides, say=say,
                      task_options=task_options, load_options=load_options)
    gt = setting_groundtruth(t, gt_config, directory / "groundtruth", show_progress=show_progress,
                             say=say, backend=backend, backend_options=backend_options)
    return Prepared(t.setting, t.splits, t.task, t.recipe, t.trained, t.context, groundtruth=gt)


def _training_message(name: str, n: int, source: str, recipe: TrainRecipe | TrainFunction,
                      checkpoints: Path) -> str:
    """``training`` a new run, ``resuming`` a partial one, ``reusing`` a finished one (a rerun
    then verifies the stored epochs and continues only where needed)."""
    done = len(list(checkpoints.glob("epoch_*.pt"))) if checkpoints.is_dir() else 0
    total = getattr(recipe, "epochs", None)
    if done and (total is None or done >= total):
        return f"reusing the trained {name} ({done} epoch checkpoints in {checkpoints})"
    if done:
        return f"resuming the training of {name} after epoch {done} of {total} ({checkpoints})"
    return f"training {name} on {n} examples ({source})"
