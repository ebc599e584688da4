"""Models, model output functions, training recipes and per-epoch checkpoints."""

from tdatune.models.hf_trainer import hf_trainer_function
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe, TrainResult, train_model

__all__ = ["Task", "TrainRecipe", "TrainResult", "hf_trainer_function", "train_model"]
