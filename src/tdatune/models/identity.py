"""What identifies a model and a task, derived from the objects themselves rather than listed
by hand: a stored result (checkpoints, a ground truth, a sweep cell) records it, and a rerun
whose identity differs recomputes or refuses, naming the field that changed.

* :func:`architecture`: the module tree (every submodule's path, class and ``extra_repr``),
  every parameter's and buffer's name, shape and dtype, and a Hugging Face model's config.
* :func:`task_identity`: every field of :class:`~tdatune.models.task.Task`, found with
  :func:`dataclasses.fields` (so a field added to ``Task`` is part of the identity without
  anyone remembering to add it), callables by qualified name, the model by its architecture.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from tdatune.models.task import Task, callable_name
from tdatune.utils.fingerprint import fingerprint_config, fingerprint_tensors

IDENTITY_FORMAT = 1  # bump when what the identity records changes
# Hugging Face config entries that say where or with what a model was saved, not what it is.
_VOLATILE_CONFIG = ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype",
                    "dtype", "_attn_implementation_autoset")


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def architecture(model: nn.Module) -> dict[str, Any]:
    """The model's structure: class, trainable-parameter count and a fingerprint of its module
    tree, parameter and buffer shapes and dtypes (and a Hugging Face ``config``)."""
    tree = {
        "modules": [[name, _class_name(type(m)), m.extra_repr()] for name, m in model.named_modules()],
        "parameters": [[n, list(p.shape), str(p.dtype), bool(p.requires_grad)]
                       for n, p in model.named_parameters()],
        "buffers": [[n, list(b.shape), str(b.dtype)] for n, b in model.named_buffers()],
    }
    config = getattr(model, "config", None)
    if callable(getattr(config, "to_dict", None)):
        tree["config"] = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG}
    return {"class": _class_name(type(model)),
            "n_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "fingerprint": fingerprint_config(tree)}


def describe_value(value: Any) -> Any:
    """A JSON-ready description of one task field: callables by ``module:qualname`` (a torch
    module also by its ``repr``, which holds its options), plain values as they are."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, nn.Module):
        return f"{callable_name(value)} {value!r}"
    if callable(value):
        return callable_name(value)
    if isinstance(value, dict):
        return {str(k): describe_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [describe_value(v) for v in value]
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)} {fingerprint_tensors(value)}"
    return json.loads(json.dumps(value, default=repr))


def task_identity(task: Task, model: nn.Module | None = None) -> dict[str, Any]:
    """Every field of ``task``, with the model factory replaced by the architecture of the model
    it builds (``model`` when already built; the global RNG is left as it was)."""
    identity: dict[str, Any] = {"identity_format": IDENTITY_FORMAT}
    for f in fields(task):
        value = getattr(task, f.name)
        if f.name == "make_model":
            if model is None:
                with torch.random.fork_rng(devices=[]):
                    model = value()
            identity["architecture"] = architecture(model)
        else:
            identity[f.name] = describe_value(value)
    return identity


__all__ = ["IDENTITY_FORMAT", "architecture", "describe_value", "task_identity"]
