"""What identifies a model and a task, derived from the objects themselves rather than listed
by hand: a stored result (checkpoints, a ground truth, a sweep cell) records it, and a rerun
whose identity differs recomputes or refuses, naming the field that changed.

* :func:`architecture`: the module tree (every submodule's path, class and ``extra_repr``),
  every parameter's and buffer's name, shape and dtype, and a Hugging Face model's config.
* :func:`task_identity`: every field of :class:`~tdatune.models.task.Task`, found with
  :func:`dataclasses.fields` (so a field added to ``Task`` is part of the identity without
  anyone remembering to add it), each by its content (a loss module with its options, a
  function with its source and closure), the model by its architecture.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import nn

from tdatune.models.task import Task
from tdatune.utils.fingerprint import describe_content, fingerprint_config, is_plain, source_fingerprint

IDENTITY_FORMAT = 2  # bump when what the identity records changes (2: every field by content)
# Hugging Face config entries that say where or with what a model was saved, not what it is.
_VOLATILE_CONFIG = ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype",
                    "dtype", "_attn_implementation_autoset")


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Public attributes of a module that say how it was loaded or used, not what it computes.
_VOLATILE_ATTRIBUTES = ("training", "name_or_path", "is_loaded_in_8bit", "is_loaded_in_4bit",
                        "is_quantized", "warnings_issued")


def module_options(module: nn.Module) -> dict[str, Any]:
    """A module's own plain options (numbers, strings, tuples of them), read off its public
    attributes: ``eps`` and ``momentum`` of a norm, ``scale`` of a custom block, ``p`` of dropout,
    whether or not its ``extra_repr`` shows them."""
    return {k: v for k, v in sorted(vars(module).items())
            if not k.startswith("_") and k not in _VOLATILE_ATTRIBUTES and is_plain(v)}


def architecture(model: nn.Module) -> dict[str, Any]:
    """The model's structure: class, trainable-parameter count and a fingerprint of its module
    tree (every submodule's path, class, ``extra_repr``, plain options and, for classes outside
    torch and transformers, source), parameter and buffer shapes and dtypes, and a Hugging Face
    ``config``. Weights are not part of it: they are what training produces."""
    tree = {
        "modules": [[name, _class_name(type(m)), m.extra_repr(), describe_content(module_options(m)),
                     source_fingerprint(type(m))] for name, m in model.named_modules()],
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
    """A JSON-ready description of one task field by its content
    (:func:`tdatune.utils.fingerprint.describe_content`): a loss module with its options and
    state, a function with its source, defaults and closure, a partial with its arguments."""
    return describe_content(value)


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


def record_versions(record: dict[str, Any]) -> tuple[int, int]:
    """(record format, task identity format) of a stored manifest or checkpoint record (1 where
    a format predates the field)."""
    task = record.get("task")
    return (int(record.get("format", 1)),
            int(task.get("identity_format", 1)) if isinstance(task, dict) else 1)


def refuse_older_format(stored: dict[str, Any], current: dict[str, Any], directory: Any,
                        what: str, redo: str) -> None:
    """Raise when ``stored`` was written in an older format than ``current``: its fields cannot
    be compared with today's, so it can be neither reused nor upgraded; the message names the
    ``directory`` holding ``what`` ("checkpoints") and the command that rebuilds it (``redo``:
    the verb)."""
    old, new = record_versions(stored), record_versions(current)
    if old == new:
        return
    raise ValueError(
        f"{directory} holds {what} recorded by an older tdatune (record format {old[0]}, task "
        f"identity format {old[1]}; this version writes {new[0]} and {new[1]}), which cannot "
        f"tell whether they are of this run; delete it (rm -r {directory}) and rerun to {redo}, "
        "or use another directory")


__all__ = ["IDENTITY_FORMAT", "architecture", "describe_value", "module_options", "record_versions",
           "refuse_older_format", "task_identity"]
