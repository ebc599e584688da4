"""A :class:`~tdatune.models.training.TrainFunction` that trains with Hugging Face's
``transformers.Trainer``: LDS ground truth (and ``train_model``) for a model you would fine-tune
with the Trainer anyway.

::

    training = hf_trainer_function(bert_task, learning_rate=1e-3, num_train_epochs=2,
                                   per_device_train_batch_size=16)
    gt = build_ground_truth(bert_task, training, train, explained, config, "runs/gt")

Each call seeds everything with the model's seed, builds a fresh model with the task's
``make_model()``, hands the examples to the Trainer as dicts (``{"input_ids", ...,
"labels"}``; the Trainer minimises the loss the model computes from ``labels``) and returns the
trained state. The Trainer writes into a temporary directory that is removed afterwards, reports
to nowhere and saves nothing. ``transformers`` (with ``accelerate``, which the Trainer needs) is
imported only when the function is made.
"""

from __future__ import annotations

import difflib
import tempfile
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from tdatune.data.base import ArrayDataset
from tdatune.data.batches import Tree, tree_map
from tdatune.models.task import Task, callable_name, model_state
from tdatune.models.training import TrainFunction, TrainResult

# Set by every call, not by the user: the seed is the ground truth's model seed.
RESERVED_ARGS = ("output_dir", "seed", "data_seed")
# What nobody retraining dozens of models wants, unless asked otherwise: the Trainer reports
# to no tracker, saves no checkpoint and trains on the CPU (use_cpu=False: on the accelerator).
DEFAULT_ARGS: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "use_cpu": True}
_INSTALL = ("the Hugging Face Trainer needs transformers and accelerate: pip install "
            "'transformers[torch]' (or pip install transformers accelerate)")


class TrainerExamples(torch.utils.data.Dataset):
    """An :class:`ArrayDataset` as the dict examples the Trainer's default collator stacks.

    A dict of inputs is used as it is (a whole batch ``{"input_ids", "attention_mask",
    "labels"}`` needs nothing else); a tensor of inputs becomes ``{input_name: x}``; separate
    targets are added as ``{label_name: y}`` (a dict of targets is merged in).
    """

    def __init__(self, data: ArrayDataset, label_name: str = "labels",
                 input_name: str = "input_ids") -> None:
        self.data = data
        self.label_name = label_name
        self.input_name = input_name
        self._features(data.inputs, "inputs", input_name)
        if not data.whole_batch:
            self._features(data.targets, "targets", label_name)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Example ``i`` as one dict of tensors."""
        data = self.data
        row = self._features(tree_map(lambda t: t[i], data.inputs), "inputs", self.input_name)
        if not data.whole_batch:
            targets = self._features(tree_map(lambda t: t[i], data.targets), "targets",
                                     self.label_name)
            clash = sorted(set(row) & set(targets))
            if clash:
                raise ValueError(f"inputs and targets both hold {clash}; give each name once")
            row.update(targets)
        return row

    @staticmethod
    def _features(tree: Tree, what: str, name: str) -> dict[str, torch.Tensor]:
        if isinstance(tree, torch.Tensor):
            return {name: tree}
        if isinstance(tree, Mapping) and all(isinstance(v, torch.Tensor) for v in tree.values()):
            return {str(k): v for k, v in tree.items()}
        raise ValueError(
            f"the Hugging Face Trainer calls the model with named arguments, but the {what} are "
            f"a {type(tree).__name__} of tensors, not one tensor or a dict of them; give the data "
            "as a dict, e.g. {'input_ids': ..., 'attention_mask': ..., 'labels': ...}")


def hf_trainer_function(task: Task | Callable[[], nn.Module], *, show_progress: bool = False,
                        label_name: str = "labels", input_name: str = "input_ids",
                        **training_args: Any) -> TrainFunction:
    """A :class:`TrainFunction` that trains ``task``'s model (``task.make_model()``, or a model
    factory) with ``transformers.Trainer`` and ``TrainingArguments(**training_args)``.

    ``seed`` and ``data_seed`` are the retrained model's seed and ``output_dir`` a temporary
    directory, so they cannot be given; by default the Trainer reports to nothing, saves
    nothing and uses the CPU (``use_cpu=False`` for an accelerator). ``training_args`` are
    recorded as the function's ``options`` (part of every manifest and checkpoint record);
    ``show_progress`` (the Trainer's bar and log lines) is not. The Trainer's ``weight_decay``
    becomes the function's L2 coefficient for the curvature attributors (the Trainer applies it
    to every weight but biases and LayerNorm, decoupled for AdamW: an approximation).
    """
    args = _check_training_args(training_args)
    make_model = task.make_model if isinstance(task, Task) else task
    if not callable(make_model):
        raise TypeError(f"hf_trainer_function needs a Task or a model factory, got "
                        f"{type(task).__name__}")
    fn = partial(train_with_trainer, make_model=make_model, show_progress=show_progress,
                 label_name=label_name, input_name=input_name)
    names = "" if (label_name, input_name) == ("labels", "input_ids") else (
        f", label_name={label_name!r}, input_name={input_name!r}")
    return TrainFunction(fn, weight_decay=float(args.get("weight_decay", 0.0)), options=args,
                         name=(f"{__name__}:train_with_trainer(make_model="
                               f"{callable_name(make_model)}{names})"))


def train_with_trainer(data: ArrayDataset, seed: int, *, make_model: Callable[[], nn.Module],
                       show_progress: bool = False, label_name: str = "labels",
                       input_name: str = "input_ids", **training_args: Any) -> TrainResult:
    """Train a fresh ``make_model()`` on ``data`` with ``transformers.Trainer`` from ``seed``;
    return its state (parameters and persistent buffers) and the Trainer's mean training loss."""
    transformers = _import_transformers()
    args = _check_training_args(training_args)
    transformers.set_seed(int(seed))
    model = make_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_model() returned {type(model).__name__}, not an nn.Module")
    examples = TrainerExamples(data, label_name, input_name)
    with tempfile.TemporaryDirectory(prefix="tdatune_trainer_") as out:
        arguments = transformers.TrainingArguments(
            output_dir=out, seed=int(seed), data_seed=int(seed),
            **{"disable_tqdm": not show_progress, **DEFAULT_ARGS, **args})
        trainer = transformers.Trainer(model=model, args=arguments, train_dataset=examples)
        if not show_progress:
            trainer.remove_callback(transformers.PrinterCallback)
        metrics = trainer.train().metrics
    state = model_state(model)
    loss = metrics.get("train_loss")
    history = [{"epoch": 0, **({} if loss is None else {"train_loss": float(loss)})}]
    return TrainResult(state=state, checkpoints=[state], history=history)


def _check_training_args(training_args: dict[str, Any]) -> dict[str, Any]:
    """The user's TrainingArguments, refused (with the fix) when reserved or unknown."""
    reserved = [k for k in RESERVED_ARGS if k in training_args]
    if reserved:
        raise ValueError(
            f"hf_trainer_function sets {', '.join(reserved)} itself (the seed is each retrained "
            "model's own, the output directory a temporary one); leave them out")
    transformers = _import_transformers()
    import dataclasses

    known = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    unknown = sorted(k for k in training_args if k not in known)
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
                         for k, h in hints.items())
        raise ValueError(f"not TrainingArguments of transformers {transformers.__version__}: "
                         f"{said}")
    return dict(training_args)


def _import_transformers() -> Any:
    """``transformers``, or an ImportError saying what to install."""
    try:
        import accelerate  # noqa: F401  (the Trainer refuses to run without it)
        import transformers
    except ImportError as exc:
        raise ImportError(f"{_INSTALL} ({exc})") from exc
    return transformers


__all__ = ["DEFAULT_ARGS", "RESERVED_ARGS", "TrainerExamples", "hf_trainer_function",
           "train_with_trainer"]
