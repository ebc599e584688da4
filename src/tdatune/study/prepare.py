"""Shared preparation of a setting for studies: train once (per-epoch checkpoints on disk),
build or reuse the LDS ground truth, and assemble the attribution context."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tdatune.attributors.base import AttributionContext
from tdatune.data.base import Splits
from tdatune.evaluate.groundtruth import GroundTruth, GroundTruthConfig, build_ground_truth
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe, TrainResult, train_model
from tdatune.settings.registry import Setting, get_setting
from tdatune.utils.device import resolve_device


@dataclass
class Prepared:
    """A trained setting with its ground truth, ready for attribution."""

    setting: Setting
    splits: Splits
    task: Task
    recipe: TrainRecipe
    trained: TrainResult
    groundtruth: GroundTruth
    context: AttributionContext

    def test_accuracy(self) -> float:
        """Accuracy of the final model on the test split."""
        model, params = self.context.model_at(-1)
        dev = self.context.device
        return self.task.accuracy(model, params, self.splits.test.inputs.to(dev),
                                  self.splits.test.targets.to(dev))


def epoch_learning_rates(recipe: TrainRecipe, n_train: int) -> list[float]:
    """The learning rate in force at the start of each epoch (TracIn's weights); 1 for L-BFGS."""
    if recipe.optimizer == "lbfgs":
        return [1.0] * recipe.epochs
    steps = max(1, -(-n_train // recipe.batch_size))
    return [recipe.lr_at(e * steps, recipe.epochs * steps) for e in range(recipe.epochs)]


def prepare_setting(
    name: str, directory: str | Path, gt_config: GroundTruthConfig, *, seed: int = 0,
    data_dir: str | None = None, sizes: tuple[int, int, int] | None = None,
    device: str | torch.device | None = "auto", show_progress: bool = True,
    recipe_overrides: dict[str, Any] | None = None, say: Any = print,
    backend: str = "auto", backend_options: dict[str, Any] | None = None,
) -> Prepared:
    """Train ``name`` into ``directory/checkpoints`` and build ``directory/groundtruth``;
    both are reused (resumed) when already there. ``backend`` picks how subset models are
    retrained (auto, sequential, batched, process, ray; see ``evaluate.runners.make_runner``)."""
    from dataclasses import replace

    directory = Path(directory)
    dev = resolve_device(device)
    setting = get_setting(name)
    splits, task = setting.build(seed=seed, data_dir=data_dir, sizes=sizes)
    recipe = replace(setting.recipe, **(recipe_overrides or {}))
    say(f"training {setting.name} on {len(splits.train)} examples ({splits.source})")
    trained = train_model(task, splits.train, recipe, seed, device=dev,
                          checkpoint_dir=directory / "checkpoints", show_progress=show_progress)
    say(f"ground truth: {gt_config.n_subsets} subsets x {gt_config.seeds_per_subset} seed(s), "
        f"alpha={gt_config.alpha}, {len(splits.test)} test examples")
    gt = build_ground_truth(task, recipe, splits.train, splits.test, gt_config,
                            directory / "groundtruth", device=dev, show_progress=show_progress,
                            backend=backend, backend_options=backend_options)
    context = AttributionContext(
        task, splits.train, trained.checkpoints, weight_decay=recipe.weight_decay,
        learning_rates=epoch_learning_rates(recipe, len(splits.train)), device=dev,
        show_progress=show_progress,
    )
    return Prepared(setting, splits, task, recipe, trained, gt, context)
