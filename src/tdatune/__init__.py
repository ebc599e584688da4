"""tdatune: training-data attribution that picks its own hyperparameters without retraining.

Layers (a module imports only from layers to its left):
utils -> data -> models -> settings -> features -> curvature -> attributors -> select
-> evaluate -> study -> cli

The plug-in point for your own model is importable from here (loaded on first use, so
``import tdatune`` stays light): ``make_task``, ``as_dataset``, ``TrainFunction``,
``TrainRecipe``, ``user_setting``, ``attribute`` (see docs/your_model.md).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "make_task": "tdatune.models.task",
    "Task": "tdatune.models.task",
    "as_dataset": "tdatune.data.base",
    "ArrayDataset": "tdatune.data.base",
    "TrainFunction": "tdatune.models.training",
    "TrainRecipe": "tdatune.models.training",
    "as_checkpoints": "tdatune.models.checkpoints",
    "user_setting": "tdatune.settings.registry",
    "attribute": "tdatune.study.attribute",
}


def __getattr__(name: str) -> Any:
    """Load the plug-in point's names on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tdatune' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
