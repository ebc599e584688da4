"""The registry of named, reproducible benchmark settings, and user tasks referenced as
``package.module:function`` (the function returns a :class:`Setting`, e.g. one made by
:func:`user_setting`). Built-in settings and user tasks are the same kind of object and go
through the same code everywhere (training, ground truth, the lambda study, sweeps)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from tdatune.data.base import ArrayDataset, Splits, as_split
from tdatune.models.task import Task
from tdatune.models.training import TrainFunction, TrainRecipe


@dataclass(frozen=True)
class Setting:
    """A benchmark setting.

    ``load(n_train, n_val, n_test, seed, data_dir, **load_options)`` returns the splits and
    ``make_task(splits, **task_options)`` the task (picklable model factory, loss, output).
    ``data_source`` says what is used when no ``data_dir`` is given ("real" or "stand-in");
    ``real_data`` says what real files ``data_dir`` may point at. ``tiny_*`` fields shrink data,
    model and recipe for smoke tests.
    """

    name: str
    description: str
    data_source: str  # "real" or "stand-in" (without data_dir)
    sizes: tuple[int, int, int]  # default train / val / test
    load: Callable[..., Splits]
    make_task: Callable[..., Task]
    recipe: TrainRecipe | TrainFunction
    tiny_sizes: tuple[int, int, int] = (64, 16, 16)
    notes: str = ""
    recipe_overrides_tiny: dict[str, object] = field(default_factory=dict)
    real_data: str = ""
    load_options: dict[str, Any] = field(default_factory=dict)
    tiny_load_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    tiny_task_options: dict[str, Any] = field(default_factory=dict)
    sequence: bool = False  # block-loss task over token sequences (reports unigram baselines)

    def __post_init__(self) -> None:
        if self.data_source not in ("real", "stand-in"):
            raise ValueError(f"setting {self.name}: data_source must be 'real' or 'stand-in', "
                             f"got {self.data_source!r}")

    def resolved_options(self, *, tiny: bool = False, task_options: dict[str, Any] | None = None,
                         load_options: dict[str, Any] | None = None
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(load options, task options) after the tiny defaults and the caller's overrides."""
        load = {**self.load_options, **(self.tiny_load_options if tiny else {}),
                **(load_options or {})}
        task = {**self.task_options, **(self.tiny_task_options if tiny else {}),
                **(task_options or {})}
        return load, task

    def build(self, *, seed: int = 0, data_dir: str | Path | None = None,
              sizes: tuple[int, int, int] | None = None, tiny: bool = False,
              task_options: dict[str, Any] | None = None,
              load_options: dict[str, Any] | None = None) -> tuple[Splits, Task]:
        """Load the data (default sizes, ``tiny`` ones, or ``sizes``) and make the task.

        ``task_options`` override model options (e.g. ``{"width": 16}`` for ResNet-9) and
        ``load_options`` data options (e.g. ``{"block_len": 32}``).
        """
        n_train, n_val, n_test = sizes or (self.tiny_sizes if tiny else self.sizes)
        load_opts, task_opts = self.resolved_options(tiny=tiny, task_options=task_options,
                                                     load_options=load_options)
        splits = self.load(n_train=n_train, n_val=n_val, n_test=n_test, seed=seed,
                           data_dir=data_dir, **load_opts)
        return splits, self.make_task(splits, **task_opts)

    def tiny_recipe(self) -> TrainRecipe | TrainFunction:
        """The recipe shortened for smoke tests (a training function is used as it is)."""
        if isinstance(self.recipe, TrainFunction):
            return self.recipe
        return replace(self.recipe, **{"epochs": 2, **self.recipe_overrides_tiny})


SETTINGS: dict[str, Setting] = {}


def register(setting: Setting) -> Setting:
    """Add ``setting`` to the registry (names are unique)."""
    if setting.name in SETTINGS:
        raise ValueError(f"setting {setting.name!r} is already registered")
    SETTINGS[setting.name] = setting
    return setting


def get_setting(name: str) -> Setting:
    """The setting called ``name``, or the user task ``package.module:function`` (a function
    returning a :class:`Setting`, or a Setting object), listing the valid names on error."""
    _load_builtin()
    if ":" in name:
        return load_task_reference(name)
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; choose one of: {', '.join(sorted(SETTINGS))}"
                         ", or a task of your own as package.module:function")
    return SETTINGS[name]


_REFERENCED: dict[str, Setting] = {}


def load_task_reference(ref: str) -> Setting:
    """Import ``package.module:function`` and return the :class:`Setting` it makes (cached per
    reference, so a sweep gets one object). The current directory is importable, as with
    ``python -m``, so ``examples.your_model:regression_setting`` works from the repository."""
    if ref in _REFERENCED:
        return _REFERENCED[ref]
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ValueError(f"task reference {ref!r} must look like package.module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"task {ref!r}: cannot import module {module_name!r} ({exc}); run from "
                         "the directory that holds it, add it to PYTHONPATH, or pip install "
                         "your package") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"task {ref!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    setting = obj if isinstance(obj, Setting) else obj() if callable(obj) else obj
    if not isinstance(setting, Setting):
        raise ValueError(
            f"task {ref!r} must be (or return) a tdatune Setting, got {type(setting).__name__}; "
            "build one with tdatune.settings.user_setting(name, task, train, val, test, "
            "recipe_or_training_function)")
    _REFERENCED[ref] = setting
    return setting


def _fixed_splits(n_train: int, n_val: int, n_test: int, seed: int,
                  data_dir: str | Path | None, *, splits: Splits) -> Splits:
    """The user's own splits, cut to the first ``n`` examples of each when smaller sizes are
    asked for (the data is fixed: ``seed`` and ``data_dir`` do not change it)."""
    parts = []
    for label, data, n in (("train", splits.train, n_train), ("val", splits.val, n_val),
                           ("test", splits.test, n_test)):
        if n > len(data):
            raise ValueError(f"{splits.name}: asked for {n} {label} examples but the task has "
                             f"{len(data)}; lower the sizes")
        parts.append(data if n == len(data) else data.slice(0, n))
    return Splits(*parts, name=splits.name, source=splits.source,
                  num_classes=splits.num_classes, info=splits.info)


def _same_task(splits: Splits, *, task: Task) -> Task:
    return task


def user_setting(
    name: str, task: Task, train: Any, val: Any, test: Any,
    recipe: TrainRecipe | TrainFunction, *, description: str = "", num_classes: int = 0,
    source: str = "user data",
) -> Setting:
    """A :class:`Setting` from your own task and data (tensors, Datasets, DataLoaders or
    ArrayDatasets; see :func:`tdatune.data.as_dataset`) and a recipe or your own training
    function. Return it from a function ``f`` and use ``package.module:f`` wherever a setting
    name goes (``tdatune lambda``, ``groundtruth``, ``train``, sweep specs)."""
    parts: list[ArrayDataset] = [as_split(d, split) for d, split in (
        (train, "training data"), (val, "validation set"), (test, "test set"))]
    splits = Splits(*parts, name=name, source=source, num_classes=num_classes)
    return Setting(
        name=name, description=description or f"user task {name}", data_source="real",
        sizes=(len(parts[0]), len(parts[1]), len(parts[2])),
        load=partial(_fixed_splits, splits=splits), make_task=partial(_same_task, task=task),
        recipe=recipe, tiny_sizes=tuple(min(k, len(d)) for k, d in zip(
            (64, 16, 16), parts, strict=True)),  # type: ignore[arg-type]
        real_data="given in Python by the task function",
    )


def all_settings() -> list[Setting]:
    """Every registered setting, in registration order."""
    _load_builtin()
    return list(SETTINGS.values())


def _load_builtin() -> None:
    import tdatune.settings.builtin  # noqa: F401  (registers on import)
