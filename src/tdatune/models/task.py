"""A Task bundles what attribution needs to know about a model: how to build it, its
per-example training loss and the output function being explained."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from tdatune.models.outputs import OutputFn, cross_entropy, get_output_fn

Params = dict[str, torch.Tensor]


@dataclass
class Task:
    """Model factory + per-example loss + output function, all batched over examples.

    ``make_model()`` must build the architecture deterministically up to its initialisation
    (training seeds ``torch.manual_seed`` before calling it).
    """

    make_model: Callable[[], nn.Module]
    output: str = "margin"
    loss_fn: OutputFn = cross_entropy
    name: str = "task"
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def output_fn(self) -> OutputFn:
        """The named output function."""
        return get_output_fn(self.output)

    def evaluate(
        self, model: nn.Module, params: Params, inputs: torch.Tensor, targets: torch.Tensor,
        *, fn: str = "output", batch_size: int = 1024,
    ) -> torch.Tensor:
        """Per-example outputs (``fn='output'``) or losses (``fn='loss'``) under ``params``."""
        func = self.output_fn if fn == "output" else self.loss_fn
        model.eval()
        values = []
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                logits = functional_call(model, params, (inputs[start : start + batch_size],))
                values.append(func(logits, targets[start : start + batch_size]))
        return torch.cat(values) if values else torch.empty(0)

    def accuracy(self, model: nn.Module, params: Params, inputs: torch.Tensor,
                 targets: torch.Tensor, batch_size: int = 1024) -> float:
        """Fraction of correct argmax predictions (token-level for sequences)."""
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                logits = functional_call(model, params, (inputs[start : start + batch_size],))
                pred = logits.argmax(-1)
                tgt = targets[start : start + batch_size]
                correct += int((pred == tgt).sum())
                total += tgt.numel()
        return correct / max(total, 1)


def model_params(model: nn.Module) -> Params:
    """Detached copies of a module's trainable parameters, by name."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def model_state(model: nn.Module) -> Params:
    """Detached copies of parameters and buffers (BatchNorm statistics), by name."""
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    state.update({k: v.detach().clone() for k, v in model.named_buffers()})
    return state
