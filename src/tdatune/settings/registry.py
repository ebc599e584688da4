"""The registry of named, reproducible benchmark settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tdatune.data.base import Splits
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe


@dataclass(frozen=True)
class Setting:
    """A benchmark setting. ``load(n_train, n_val, n_test, seed, data_dir)`` returns the splits;
    ``make_task(splits)`` the task (model factory, loss, output function)."""

    name: str
    description: str
    data_source: str  # "real" or "stand-in"
    sizes: tuple[int, int, int]  # default train / val / test
    load: Callable[..., Splits]
    make_task: Callable[[Splits], Task]
    recipe: TrainRecipe
    tiny_sizes: tuple[int, int, int] = (64, 16, 16)
    notes: str = ""
    recipe_overrides_tiny: dict[str, object] = field(default_factory=dict)

    def build(self, *, seed: int = 0, data_dir: str | Path | None = None,
              sizes: tuple[int, int, int] | None = None, tiny: bool = False) -> tuple[Splits, Task]:
        """Load the data (default sizes, ``tiny`` ones, or ``sizes``) and make the task."""
        n_train, n_val, n_test = sizes or (self.tiny_sizes if tiny else self.sizes)
        splits = self.load(n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, data_dir=data_dir)
        return splits, self.make_task(splits)

    def tiny_recipe(self) -> TrainRecipe:
        """The recipe shortened for smoke tests."""
        from dataclasses import replace

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
