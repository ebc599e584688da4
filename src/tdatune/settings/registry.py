"""The registry of named, reproducible benchmark settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tdatune.data.base import Splits
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe


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
    recipe: TrainRecipe
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

    def tiny_recipe(self) -> TrainRecipe:
        """The recipe shortened for smoke tests."""
        return replace(self.recipe, **{"epochs": 2, **self.recipe_overrides_tiny})


SETTINGS: dict[str, Setting] = {}


def register(setting: Setting) -> Setting:
    """Add ``setting`` to the registry (names are unique)."""
    if setting.name in SETTINGS:
        raise ValueError(f"setting {setting.name!r} is already registered")
    SETTINGS[setting.name] = setting
    return setting


def get_setting(name: str) -> Setting:
    """The setting called ``name``, listing the valid names on error."""
    _load_builtin()
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; choose one of: {', '.join(sorted(SETTINGS))}")
    return SETTINGS[name]


def all_settings() -> list[Setting]:
    """Every registered setting, in registration order."""
    _load_builtin()
    return list(SETTINGS.values())


def _load_builtin() -> None:
    import tdatune.settings.builtin  # noqa: F401  (registers on import)
