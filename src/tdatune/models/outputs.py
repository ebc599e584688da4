"""Per-example losses and model output functions f(z; theta), batched over a leading axis.

Every function here is called as ``fn(outputs, y)`` and returns one value per example [B]; a
task may use any callable of that form instead (see :class:`tdatune.models.task.Task`).

Classification: ``logits`` [B, C], ``targets`` [B]. Sequences: ``logits`` [B, T, V],
``targets`` [B, T]; the loss is the mean token cross-entropy of the block and every output
function is the negative of that loss (as in the language-model benchmarks of the literature).

Hugging Face models: the built-in functions take a ``ModelOutput`` (or any object with a
``logits`` attribute, or a mapping with a ``"logits"`` entry) as the outputs and read its
logits, and a dict batch with a ``"labels"`` entry as the targets and read the labels, so a
``BertForSequenceClassification`` fed ``{"input_ids", "attention_mask", "labels"}`` needs no
``forward=`` and no loss of its own. transformers is never imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

OutputFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_LOGITS_FIX = ("give forward=, a module-level function (model, x) -> model(**x).logits (or "
               "whatever tensor your model's output holds), or a loss / output callable that "
               "takes your model's outputs")


def logits_of(outputs: Any) -> torch.Tensor:
    """The tensor a built-in loss or output reads: ``outputs`` itself, or the ``logits`` of a
    Hugging Face ``ModelOutput`` (an attribute ``.logits`` or a mapping entry ``"logits"``)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    found = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    what = type(outputs).__name__
    if isinstance(outputs, Mapping):
        what += f" with keys {list(outputs)[:6]}"
    elif isinstance(outputs, (tuple, list)):
        what += f" of {len(outputs)}"
    raise TypeError(f"the built-in losses and outputs need the model's logits: a tensor, or an "
                    f"output with a 'logits' tensor (a Hugging Face ModelOutput); the model "
                    f"returned {what}. Fix: {_LOGITS_FIX}")


def labels_of(targets: Any) -> torch.Tensor:
    """The targets a built-in loss or output compares with: ``targets`` itself, or the
    ``"labels"`` entry of a dict batch (the Hugging Face convention)."""
    if isinstance(targets, torch.Tensor):
        return targets
    if isinstance(targets, Mapping) and isinstance(targets.get("labels"), torch.Tensor):
        return targets["labels"]
    what = (f"a dict batch with keys {list(targets)[:6]}" if isinstance(targets, Mapping)
            else type(targets).__name__)
    raise TypeError(f"the built-in losses and outputs need the targets: a tensor, or a dict batch "
                    f"with a 'labels' entry; got {what}. Fix: name the labels 'labels', or give "
                    "a loss / output callable (outputs, batch) -> [B] that picks them out")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy; mean over tokens for sequences. Shape [B]."""
    logits, targets = logits_of(logits), labels_of(targets)
    if logits.dim() == 3:
        tok = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return tok.mean(dim=1)
    return F.cross_entropy(logits, targets, reduction="none")


def margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Correct-class margin log(p_y / (1 - p_y)) = z_y - logsumexp_{k != y} z_k (stable form)."""
    logits, targets = logits_of(logits), labels_of(targets)
    if logits.dim() == 3:
        return -cross_entropy(logits, targets)
    correct = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Correct-class probability p_y."""
    logits, targets = logits_of(logits), labels_of(targets)
    if logits.dim() == 3:
        return torch.exp(-cross_entropy(logits, targets))
    return torch.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)


def negative_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Minus the per-example loss (so that a positive attribution raises the output)."""
    return -cross_entropy(logits, targets)


def loss_output(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The per-example loss itself as the output function."""
    return cross_entropy(logits, targets)


def prediction(outputs: torch.Tensor, targets: object = None) -> torch.Tensor:
    """The model's scalar prediction per example (outputs [B] or [B, 1]): regression."""
    outputs = logits_of(outputs)
    if outputs.dim() == 2 and outputs.shape[1] == 1:
        return outputs[:, 0]
    if outputs.dim() != 1:
        raise ValueError(f"the 'prediction' output needs one number per example (outputs [B] "
                         f"or [B, 1]), got outputs of shape {list(outputs.shape)}; pass a "
                         "callable output such as lambda out, y: out[:, k]")
    return outputs


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example squared error, averaged over any non-example axes (regression loss)."""
    outputs, targets = logits_of(outputs), labels_of(targets)
    if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1:
        outputs = outputs[..., 0]
    if outputs.shape != targets.shape:
        raise ValueError(f"mse: outputs {list(outputs.shape)} and targets {list(targets.shape)} "
                         "differ in shape; the model must predict one value per target")
    err = (outputs - targets.to(outputs.dtype)) ** 2
    return err.reshape(err.shape[0], -1).mean(dim=1)


OUTPUT_FUNCTIONS: dict[str, OutputFn] = {
    "margin": margin,
    "probability": probability,
    "loss": loss_output,
    "negative_loss": negative_loss,
    "prediction": prediction,
}

LOSS_FUNCTIONS: dict[str, OutputFn] = {"cross_entropy": cross_entropy, "mse": mse}


def get_loss_fn(name: str) -> OutputFn:
    """Look up a per-example loss by name, listing the valid names on error."""
    if name not in LOSS_FUNCTIONS:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSS_FUNCTIONS)}, "
                         "or pass a callable (outputs, y) -> per-example losses [B]")
    return LOSS_FUNCTIONS[name]


def get_output_fn(name: str) -> OutputFn:
    """Look up an output function by name, listing the valid names on error."""
    if name not in OUTPUT_FUNCTIONS:
        raise ValueError(f"unknown output function {name!r}; choose one of: "
                         f"{', '.join(OUTPUT_FUNCTIONS)}, or pass a callable (outputs, y) -> [B]")
    return OUTPUT_FUNCTIONS[name]
