"""Checkpoints from your own training loop: state dicts in memory, modules, or files on disk,
checked against the task's model before any work starts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdatune.models.task import Params, Task

# Keys under which training loops commonly nest the model's state dict in a saved file.
STATE_KEYS = ("state", "state_dict", "model_state_dict", "model_state", "model")


def state_of(item: Any, where: str = "checkpoint") -> Params:
    """A state dict (parameters + buffers) from a module, a state dict, a file path, or a
    dict nesting the state under one of ``STATE_KEYS``."""
    if isinstance(item, nn.Module):
        return {k: v.detach().clone() for k, v in item.state_dict().items()}
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: no checkpoint file at {path}")
        item = torch.load(path, map_location="cpu", weights_only=False)
        where = f"{where} ({path})"
    if isinstance(item, Mapping):
        if item and all(isinstance(v, torch.Tensor) for v in item.values()):
            return {str(k): v.detach() for k, v in item.items()}
        for key in STATE_KEYS:
            if key in item:
                return state_of(item[key], f"{where}[{key!r}]")
    raise ValueError(
        f"{where} is not a model state: expected an nn.Module, a state dict (name -> tensor), a "
        f"path to a file saved with torch.save(model.state_dict(), path), or a dict holding one "
        f"under {', '.join(map(repr, STATE_KEYS))}; got {type(item).__name__}"
        + (f" with keys {list(item)[:6]}" if isinstance(item, Mapping) else "")
    )


def check_state(task: Task, state: Params, model: nn.Module | None = None,
                where: str = "checkpoint") -> None:
    """Refuse a state whose keys or shapes do not match the task's model, naming them."""
    if model is None:
        with torch.random.fork_rng(devices=[]):
            model = task.make_model()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        hint = ""
        if any(k.startswith(("module.", "_orig_mod.")) for k in unexpected):
            hint = (" The saved names carry a 'module.' / '_orig_mod.' prefix (DataParallel or "
                    "torch.compile): save model.module.state_dict() (or the uncompiled model's), "
                    "or strip the prefix.")
        raise ValueError(
            f"{where} does not match the model of task {task.name!r}: missing keys "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected keys "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}.{hint} Fix: save the "
            "state_dict() of the same architecture that make_model() builds"
        )
    wrong = [(k, expected[k], tuple(state[k].shape)) for k in expected
             if tuple(state[k].shape) != expected[k]]
    if wrong:
        k, want, got = wrong[0]
        raise ValueError(
            f"{where} does not match the model of task {task.name!r}: {k} has shape "
            f"{list(got)} but the model's is {list(want)} ({len(wrong)} tensor(s) differ); "
            "build the model with the same sizes as the run that saved the checkpoint"
        )


def as_checkpoints(task: Task, checkpoints: Any) -> list[Params]:
    """Per-epoch states for :class:`tdatune.attributors.AttributionContext` from what your own
    loop kept: one module / state dict / path, or a list of them (oldest first, last = the
    trained model). Every state is checked against ``task.make_model()``."""
    items: Iterable[Any]
    if isinstance(checkpoints, (nn.Module, str, Path, Mapping)):
        items = [checkpoints]
    else:
        items = list(checkpoints)
    states = [state_of(item, f"checkpoint {i}") for i, item in enumerate(items)]
    if not states:
        raise ValueError("no checkpoints given; pass at least the trained model's state dict")
    with torch.random.fork_rng(devices=[]):
        model = task.make_model()
    for i, state in enumerate(states):
        check_state(task, state, model, where=f"checkpoint {i}")
    return states


__all__ = ["STATE_KEYS", "as_checkpoints", "check_state", "state_of"]
