"""One protocol for every attributor: fit once on the training side, then score explained
examples for one or many hyperparameter values.

Hyperparameters come in two stages. ``fit``-stage values (projection dim, checkpoint, ...)
change what ``fit`` computes and are given to the constructor; ``score``-stage values
(lambda, CG iterations, ...) are passed to ``score`` and never trigger a refit. Every value is
checked on the way in; unknown names are refused with the list of valid ones.

Sign convention: a positive score means including training example i raises f(z').
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
from torch import nn

from tdatune.data.base import ArrayDataset
from tdatune.features.budget import AttributionEstimate, PathEstimate
from tdatune.models.checkpoints import check_state
from tdatune.models.task import Params, Task, check_task
from tdatune.models.training import load_model
from tdatune.utils.device import resolve_device


@dataclass
class AttributionContext:
    """The training side, shared by all attributors: task, data and per-epoch checkpoints."""

    task: Task
    train: ArrayDataset
    checkpoints: list[Params]
    weight_decay: float = 0.0
    learning_rates: list[float] | None = None
    device: torch.device | str | None = None
    chunk_size: int = 256
    show_progress: bool = False
    _models: dict[int, tuple[nn.Module, Params]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("AttributionContext needs at least one checkpoint (the trained model)")
        self.device = resolve_device(self.device)
        # Cheap (one forward pass on three examples, key comparisons): bad input is refused
        # here, with the fix, before any gradients are computed.
        check_task(self.task, self.train, what="training data")
        with torch.random.fork_rng(devices=[]):
            model = self.task.make_model()
        for i, state in enumerate(self.checkpoints):
            check_state(self.task, state, model, where=f"checkpoint {i}")

    def checkpoint_index(self, checkpoint: int) -> int:
        """Normalise a checkpoint index (negative counts from the last epoch)."""
        k = len(self.checkpoints)
        if not -k <= checkpoint < k:
            raise ValueError(f"checkpoint {checkpoint} out of range: {k} epochs saved (0..{k - 1} or -1)")
        return checkpoint % k

    def model_at(self, checkpoint: int = -1) -> tuple[nn.Module, Params]:
        """The model with the given epoch's state loaded, and its trainable parameters."""
        idx = self.checkpoint_index(checkpoint)
        if idx not in self._models:
            self._models[idx] = load_model(self.task, self.checkpoints[idx], self.device)
        return self._models[idx]


@dataclass(frozen=True)
class HyperParameter:
    """A named hyperparameter with its default, stage and validator."""

    name: str
    default: Any
    stage: str  # "fit" or "score"
    check: Callable[[Any], Any]
    doc: str = ""
    # False: a sweep cell names it only away from its default (an option added later whose
    # default gives the results computed before it existed, so stored cells stay current)
    named_at_default: bool = True


class Attributor(ABC):
    """Base class: subclasses declare ``name`` and ``hyperparameters`` and implement
    ``_fit`` and ``score``."""

    name: ClassVar[str]
    hyperparameters: ClassVar[tuple[HyperParameter, ...]]

    def __init__(self, **values: Any) -> None:
        self.params = self._resolve(values, stage=None)
        self.context: AttributionContext | None = None

    @classmethod
    def spec(cls) -> dict[str, HyperParameter]:
        """Hyperparameters by name."""
        return {h.name: h for h in cls.hyperparameters}

    @classmethod
    def _resolve(cls, values: dict[str, Any], stage: str | None) -> dict[str, Any]:
        spec = cls.spec()
        unknown = sorted(set(values) - set(spec))
        if unknown:
            raise ValueError(
                f"{cls.name}: unknown hyperparameter(s) {', '.join(unknown)}; valid: "
                + ", ".join(f"{h.name} (default {h.default!r})" for h in cls.hyperparameters)
            )
        out = {}
        for h in cls.hyperparameters:
            if stage is not None and h.stage != stage:
                if h.name in values:
                    raise ValueError(
                        f"{cls.name}: {h.name} is a fit-stage hyperparameter; pass it to the "
                        "constructor, not to score()"
                    )
                continue
            raw = values.get(h.name, h.default)
            try:
                out[h.name] = h.check(raw)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{cls.name}: invalid {h.name}={raw!r}: {err}") from err
        return out

    def score_params(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Score-stage values: constructor values overridden by ``overrides``, validated."""
        base = {k: v for k, v in self.params.items() if self.spec()[k].stage == "score"}
        base.update(overrides)
        return self._resolve(base, stage="score")

    def fit(self, context: AttributionContext) -> Self:
        """Do the training-side work (gradients, decompositions) once."""
        self.context = context
        self._fit(context)
        return self

    def _require_fit(self) -> AttributionContext:
        if self.context is None:
            raise RuntimeError(f"{self.name}: call fit(context) before scoring")
        return self.context

    @abstractmethod
    def _fit(self, context: AttributionContext) -> None: ...

    @abstractmethod
    def score(self, explained: ArrayDataset, **values: Any) -> torch.Tensor:
        """Scores [m, n]: row j explains example j of ``explained`` over the n training examples."""

    def memory_estimate(self, task: Task, model: nn.Module, params: Params, train: ArrayDataset,
                        *, explained: int, validation: int = 0, chunk_size: int = 256,
                        checkpoints: int | None = None
                        ) -> AttributionEstimate | PathEstimate | None:
        """The memory ``fit`` and ``score`` of ``explained`` examples will need (``validation``
        examples mapped first, for the lambda selection), from the architecture alone, no
        gradient computed (:mod:`tdatune.features.budget`), checked by ``attribute()`` before
        any work. ``checkpoints``: how many the context will hold (None: not known yet).
        None: not estimated for this attributor (its own steps still refuse gradients that
        would not fit)."""
        return None

    def surrogate_spectrum(self, explained: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, explained coordinates) for ``tdatune.select.select_lambda``: a retraining-free
        lambda for eigen-based attributors (those with a ``lambda_path``: iffim, trak, logra)."""
        path_fn = getattr(self, "lambda_path", None)
        if path_fn is None:
            raise NotImplementedError(
                f"{self.name} is not eigen-based, so it has no spectrum for the surrogate "
                "indicator; use iffim, trak or logra for retraining-free lambda selection")
        return path_fn(explained).spectrum()

    def score_grid(self, explained: ArrayDataset, grid: Iterable[dict[str, Any]]
                   ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """Scores for each score-stage setting in ``grid``, reusing all fit-stage work."""
        for values in grid:
            yield values, self.score(explained, **values)


# -- validators shared by attributors -------------------------------------------------------

def positive_float(x: Any) -> float:
    """A finite float > 0."""
    v = float(x)
    if not (v > 0 and v < float("inf")):
        raise ValueError("must be a finite number > 0")
    return v


def nonnegative_float(x: Any) -> float:
    """A finite float >= 0."""
    v = float(x)
    if not (v >= 0 and v < float("inf")):
        raise ValueError("must be a finite number >= 0")
    return v


def positive_int(x: Any) -> int:
    """An integer >= 1."""
    if isinstance(x, bool) or int(x) != x or int(x) < 1:
        raise ValueError("must be an integer >= 1")
    return int(x)


def nonnegative_int(x: Any) -> int:
    """An integer >= 0."""
    if isinstance(x, bool) or int(x) != x or int(x) < 0:
        raise ValueError("must be an integer >= 0")
    return int(x)


def optional_positive_int(x: Any) -> int | None:
    """None or an integer >= 1."""
    return None if x is None else positive_int(x)


def any_int(x: Any) -> int:
    """Any integer (e.g. a checkpoint index, -1 for the last)."""
    if isinstance(x, bool) or int(x) != x:
        raise ValueError("must be an integer")
    return int(x)


def optional_int_list(x: Any) -> list[int] | None:
    """None or a non-empty list of integers (e.g. checkpoint epochs; negative counts from the end)."""
    if x is None:
        return None
    items = [x] if isinstance(x, int) and not isinstance(x, bool) else list(x)
    if not items:
        raise ValueError("must be None or a non-empty list of integers")
    return [any_int(v) for v in items]


def boolean(x: Any) -> bool:
    """True or False (no truthy coercion of strings or numbers)."""
    if not isinstance(x, bool):
        raise ValueError("must be True or False")
    return x


def one_of(*choices: Any) -> Callable[[Any], Any]:
    """A validator accepting only ``choices``."""
    def check(x: Any) -> Any:
        if x not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}")
        return x
    return check


CHECKPOINT = HyperParameter("checkpoint", -1, "fit", any_int, "epoch whose parameters are used")
"""The fit-stage ``checkpoint`` every single-checkpoint attributor declares."""
