"""Models, model output functions, training recipes and per-epoch checkpoints."""

from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe, TrainResult, train_model

__all__ = ["Task", "TrainRecipe", "TrainResult", "train_model"]
