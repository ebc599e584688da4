"""A Task bundles what attribution needs to know about a model: how to build it, how to call
it on a batch, its per-example training loss and the output function being explained.

This is the plug-in point for any model. Batches are trees of tensors (see
:mod:`tdatune.data.batches`): ``x`` is what the model is called on and ``y`` what the loss and
the output see next to the model's outputs (for whole-batch data ``y`` is the batch itself).
The built-in settings are tasks like any user's: a tensor ``x``, ``model(x)``, cross-entropy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from tdatune.data.base import ArrayDataset
from tdatune.data.batches import Tree, batch_len, describe, tree_map
from tdatune.models.outputs import (
    LOSS_FUNCTIONS,
    OUTPUT_FUNCTIONS,
    OutputFn,
    cross_entropy,
    get_loss_fn,
    get_output_fn,
    logits_of,
    probability,
)
from tdatune.utils.checks import check_class_targets
from tdatune.utils.fingerprint import ADDRESS

Params = dict[str, torch.Tensor]
Forward = Callable[[nn.Module, Any], Any]


@dataclass
class Task:
    """Model factory + forward + per-example loss + output function, batched over examples.

    * ``make_model()`` builds the architecture; it must be deterministic up to its
      initialisation (training seeds ``torch.manual_seed`` before calling it).
    * ``forward(model, x)`` calls the model on a batch's inputs (default: ``model(x)`` for a
      tensor, ``model(*x)`` for a tuple, ``model(**x)`` for a dict).
    * ``loss_fn(outputs, y)`` is the per-example training loss, shape [B].
    * ``output`` is the function explained: a name (margin, probability, loss, negative_loss,
      prediction) or any callable ``(outputs, y) -> [B]``.
    * ``trak_weights(outputs, y) -> [B]``: TRAK's Q (default 1 - p_y for cross-entropy tasks,
      1 otherwise).

    Everything a process or Ray worker receives must pickle: use module-level functions and
    classes (or ``functools.partial`` of them), not lambdas or closures, when you retrain on
    those backends.
    """

    make_model: Callable[[], nn.Module]
    output: str | OutputFn = "margin"
    loss_fn: OutputFn = cross_entropy
    name: str = "task"
    extra: dict[str, object] = field(default_factory=dict)
    forward: Forward | None = None
    trak_weights: OutputFn | None = None

    def __post_init__(self) -> None:
        if isinstance(self.output, str):
            get_output_fn(self.output)  # refuse unknown names now, listing the valid ones
        elif not callable(self.output):
            raise TypeError(f"output must be a name ({', '.join(OUTPUT_FUNCTIONS)}) or a "
                            f"callable (outputs, y) -> [B], got {type(self.output).__name__}")
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be a callable (outputs, y) -> [B] per-example "
                            f"losses, got {type(self.loss_fn).__name__}")

    @property
    def output_fn(self) -> OutputFn:
        """The output function (looked up when given by name; ``loss`` and ``negative_loss``
        are this task's own loss)."""
        if self.output == "loss":
            return self.loss_fn
        if self.output == "negative_loss":
            return partial(_negated, self.loss_fn)
        return get_output_fn(self.output) if isinstance(self.output, str) else self.output

    @property
    def output_name(self) -> str:
        """The output's name, or ``module:qualname`` of a callable (manifests, fingerprints)."""
        return self.output if isinstance(self.output, str) else callable_name(self.output)

    @property
    def plain(self) -> bool:
        """True when the model is called as ``model(x)`` (no custom forward): the form the
        batched retraining and the fast linear-layer gradient path were written for."""
        return self.forward is None

    def call(self, model: nn.Module, params: Params, x: Tree) -> Any:
        """The model's outputs on inputs ``x`` with its parameters replaced by ``params``."""
        if self.forward is None:
            if isinstance(x, torch.Tensor):
                return functional_call(model, params, (x,))
            if isinstance(x, Mapping):
                return functional_call(model, params, (), dict(x))
            return functional_call(model, params, tuple(x))
        bound = _Bound(model, self.forward)
        return functional_call(bound, {f"model.{k}": v for k, v in params.items()}, (x,))

    def evaluate(
        self, model: nn.Module, params: Params, inputs: Tree, targets: Tree,
        *, fn: str = "output", batch_size: int = 1024,
    ) -> torch.Tensor:
        """Per-example outputs (``fn='output'``) or losses (``fn='loss'``) under ``params``."""
        func = self.output_fn if fn == "output" else self.loss_fn
        data = ArrayDataset(inputs) if targets is inputs else ArrayDataset(inputs, targets)
        device = next(iter(params.values())).device if params else "cpu"
        model.eval()
        values = []
        with torch.no_grad():
            for _, x, y in data.batches(batch_size, device):
                values.append(func(self.call(model, params, x), y))
        return torch.cat(values) if values else torch.empty(0)

    def accuracy(self, model: nn.Module, params: Params, inputs: Tree,
                 targets: Tree, batch_size: int = 1024) -> float:
        """Fraction of correct argmax predictions (token-level for sequences; the ``logits`` of
        a Hugging Face output, the ``labels`` of a dict batch); NaN when the task is not a
        classification of integer targets by outputs of one more dimension."""
        data = ArrayDataset(inputs) if targets is inputs else ArrayDataset(inputs, targets)
        device = next(iter(params.values())).device if params else "cpu"
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for _, x, y in data.batches(batch_size, device):
                try:  # a Hugging Face ModelOutput or dict: its logits
                    logits = logits_of(self.call(model, params, x))
                except (TypeError, ValueError):
                    return math.nan
                if isinstance(y, Mapping):  # a whole dict batch: its labels
                    y = y.get("labels", y.get("label"))
                if not (isinstance(y, torch.Tensor) and isinstance(logits, torch.Tensor)
                        and not y.is_floating_point() and logits.dim() == y.dim() + 1):
                    return math.nan
                correct += int((logits.argmax(-1) == y).sum())
                total += y.numel()
        return correct / max(total, 1)

    def trak_q(self, outputs: Any, y: Tree) -> torch.Tensor:
        """TRAK's per-example weights Q (1 - p_y for cross-entropy tasks, else 1)."""
        if self.trak_weights is not None:
            return self.trak_weights(outputs, y)
        if self.loss_fn is cross_entropy:
            return 1 - probability(outputs, y)
        return torch.ones(batch_len(y, "targets"), device=_device_of(y))


class _Bound(nn.Module):
    """``forward(model, x)`` as a module, so ``functional_call`` can swap the parameters."""

    def __init__(self, model: nn.Module, fn: Forward) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: Any) -> Any:
        """Call the user's forward on the wrapped model."""
        return self.fn(self.model, x)


def _negated(fn: OutputFn, outputs: Any, y: Tree) -> torch.Tensor:
    return -fn(outputs, y)


def _device_of(tree: Tree) -> torch.device:
    found: list[torch.device] = []
    tree_map(lambda t: found.append(t.device), tree)
    return found[0] if found else torch.device("cpu")


def callable_name(fn: Any) -> str:
    """``module:qualname`` of a function, class or partial (stable across runs)."""
    inner = getattr(fn, "func", fn)  # functools.partial
    name = f"{getattr(inner, '__module__', '?')}:{getattr(inner, '__qualname__', type(inner).__name__)}"
    if inner is not fn:  # without memory addresses, which change every run
        name += ADDRESS.sub("", f"(partial {getattr(fn, 'args', ())!r} "
                                f"{getattr(fn, 'keywords', {})!r})")
    return name


class ModuleFactory:
    """A model factory from a module instance: a fresh deep copy each call, with every
    submodule that has ``reset_parameters()`` re-initialised from the current torch seed (so
    retraining seeds give different initialisations). Picklable when the module is."""

    def __init__(self, module: nn.Module, reinit: bool = True) -> None:
        self.module = module
        self.reinit = reinit

    def __call__(self) -> nn.Module:
        """A new copy of the module."""
        model = copy.deepcopy(self.module)
        if self.reinit:
            for sub in model.modules():
                reset = getattr(sub, "reset_parameters", None)
                if callable(reset):
                    reset()
        return model


def make_task(
    model: nn.Module | Callable[[], nn.Module], loss: str | OutputFn, output: str | OutputFn,
    *, forward: Forward | None = None, name: str = "task", trak_weights: OutputFn | None = None,
    reinit: bool = True, extra: dict[str, object] | None = None,
) -> Task:
    """The plug-in point for your own model: a :class:`Task` from a module (or a factory),
    the per-example loss (a callable ``(outputs, y) -> [B]`` or ``cross_entropy`` / ``mse``),
    the output to explain (a callable or a name) and optionally how to call the model.

    A module instance is copied for every model built; ``reinit`` re-initialises copies
    (layers with ``reset_parameters``) from the training seed, as retraining needs.
    """
    if isinstance(model, nn.Module):
        factory: Callable[[], nn.Module] = ModuleFactory(model, reinit)
    elif callable(model):
        factory = model
    else:
        raise TypeError(f"model must be an nn.Module or a function returning one, got "
                        f"{type(model).__name__}")
    loss_fn = get_loss_fn(loss) if isinstance(loss, str) else loss
    return Task(make_model=factory, output=output, loss_fn=loss_fn, name=name, forward=forward,
                trak_weights=trak_weights, extra=dict(extra or {}))


def check_task(task: Task, data: ArrayDataset, *, model: nn.Module | None = None,
               what: str = "training data", probe: int = 3) -> None:
    """Run the task on the first few examples of ``data`` and refuse, with the fix, a batch
    the model cannot take, or a loss or output that is not one finite value per example.
    Cheap (one forward pass on ``probe`` examples): call it before any long work."""
    if len(data) == 0:
        raise ValueError(f"the {what} is empty; attribution needs at least one example")
    b = min(probe, len(data))
    if model is None:
        with torch.random.fork_rng(devices=[]):
            model = task.make_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{task.name}: make_model() returned {type(model).__name__}, not an "
                        "nn.Module; the model factory must return a torch module")
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    device = next(iter(params.values())).device if params else torch.device("cpu")
    if not params:
        raise ValueError(f"{task.name}: the model has no trainable parameters; attribution "
                         "differentiates with respect to them")
    _, x, y = next(data.slice(0, b).batches(b, device))
    how = ("forward(model, x)" if task.forward is not None else
           "model(x)" if isinstance(x, torch.Tensor) else
           "model(**x)" if isinstance(x, Mapping) else "model(*x)")
    try:
        with torch.no_grad():
            outputs = task.call(model, params, x)
    except Exception as exc:
        # A model that takes the batch's 'labels' itself (a Hugging Face model computing its
        # own loss) fails on a label out of range: name the example, not the model's error.
        _check_labels_without_them(task, model, params, data, x, what)
        raise ValueError(
            f"{task.name}: the model cannot take a batch of the {what}: {how} on "
            f"{data.slice(0, b).describe()} raised {type(exc).__name__}: {exc}. Fix: give "
            "forward=, a module-level function (model, x) -> outputs that calls your model on "
            "the batch (e.g. model(x['input_ids'], x['attention_mask'])), or put the inputs in "
            "the form your model's forward takes"
        ) from exc
    logits = _logits_or_none(outputs)
    if (task.loss_fn is cross_entropy and logits is not None
            and isinstance(data, ArrayDataset)  # a stream's labels are checked per batch
            and isinstance(data.targets, torch.Tensor) and not data.whole_batch):
        # Every label, not only the probe's: a label 12 for 10 classes anywhere in the data,
        # whether the model returns its logits or a ModelOutput / dict holding them.
        check_class_targets(f"{task.name}: the {what} targets", data.targets,
                            int(logits.shape[-1]))
    else:
        _check_batch_labels(task, outputs, data, x, what)
    for label, fn, fix in (
        ("loss", task.loss_fn, "return the per-example losses (e.g. reduction='none', and a "
                               "mean over any other axes), not their mean or sum"),
        ("output", task.output_fn, "return one number per example, e.g. outputs[:, 0] or "
                                   "outputs.squeeze(-1) for a regression prediction"),
    ):
        name = (callable_name(fn) if label == "loss" else task.output_name)
        try:
            with torch.no_grad():
                value = fn(outputs, y)
        except Exception as exc:
            raise ValueError(
                f"{task.name}: the {label} function {name} failed on the model's outputs "
                f"{_describe_any(outputs)} and targets {describe(y)}: {type(exc).__name__}: "
                f"{exc}. It is called as fn(outputs, y) with a batch of {b} examples"
            ) from exc
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (b,):
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{task.name}: the {label} function {name} must return one value per example, "
                f"shape [{b}] for a batch of {b}, but returned {got}; {fix}"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{task.name}: the {label} function {name} returned non-finite "
                             f"values on the first {b} examples of the {what}: {value.tolist()}")


def _batch_labels(task: Task, data: ArrayDataset, x: Tree) -> torch.Tensor | None:
    """The integer ``'labels'`` entry of a dict batch when it holds class indices for this
    task: read by the built-in cross-entropy, or handed to the model itself (no custom
    forward), as Hugging Face models take them. None otherwise. A stream holds no tensors:
    the probe batch's labels are checked (the rest when their batch is read)."""
    inputs = data.inputs if isinstance(data, ArrayDataset) else x
    if not isinstance(inputs, Mapping) or not isinstance(inputs.get("labels"), torch.Tensor):
        return None
    builtin = task.loss_fn is cross_entropy and data.whole_batch
    to_model = task.forward is None and isinstance(x, Mapping) and "labels" in x
    labels = inputs["labels"]
    if not (builtin or to_model) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        return None
    return labels


def _check_batch_labels(task: Task, outputs: Any, data: ArrayDataset, x: Tree, what: str) -> None:
    """Every class label of a dict batch's ``'labels'`` against the number of logits, naming
    the first example out of range (a label 12 for 10 classes, or -1)."""
    labels = _batch_labels(task, data, x)
    if labels is None:
        return
    try:
        logits = logits_of(outputs)
    except TypeError:
        return
    if logits.dim() == labels.dim() + 1:
        check_class_targets(f"{task.name}: the {what} 'labels'", labels, int(logits.shape[-1]))


def _check_labels_without_them(task: Task, model: nn.Module, params: Params, data: ArrayDataset,
                               x: Tree, what: str) -> None:
    """After the model failed on a dict batch that hands it ``'labels'``: call it without them
    and check every label against its logits (returns quietly when that does not apply)."""
    if task.forward is not None or not isinstance(x, Mapping) or "labels" not in x:
        return
    try:
        with torch.no_grad():
            outputs = task.call(model, params, {k: v for k, v in x.items() if k != "labels"})
    except Exception:
        return
    _check_batch_labels(task, outputs, data, x, what)


def _logits_or_none(outputs: Any) -> torch.Tensor | None:
    """The logits a built-in loss reads from ``outputs`` (a tensor, a ModelOutput's
    ``.logits``, a dict's ``"logits"``), or None when it holds none."""
    try:
        return logits_of(outputs)
    except TypeError:
        return None


def _describe_any(value: Any) -> str:
    try:
        return describe(value)
    except TypeError:
        return type(value).__name__


def model_params(model: nn.Module) -> Params:
    """Detached copies of a module's trainable parameters, by name."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def model_state(model: nn.Module) -> Params:
    """Detached copies of parameters and persistent buffers (BatchNorm statistics), by name:
    what ``state_dict()`` holds. Non-persistent buffers (Hugging Face's ``position_ids``) are
    rebuilt by the model's constructor and are not part of a checkpoint."""
    persistent = set(model.state_dict().keys())
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    state.update({k: v.detach().clone() for k, v in model.named_buffers() if k in persistent})
    return state


__all__ = ["LOSS_FUNCTIONS", "ModuleFactory", "Params", "Task", "callable_name", "check_task",
           "make_task", "model_params", "model_state"]
