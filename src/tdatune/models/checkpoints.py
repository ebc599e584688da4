"""Checkpoints from your own training loop: state dicts in memory, modules, files on disk, or
directories written by Hugging Face's ``save_pretrained``, checked against the task's model
before any work starts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdatune.models.task import Params, Task

# Keys under which training loops commonly nest the model's state dict in a saved file.
STATE_KEYS = ("state", "state_dict", "model_state_dict", "model_state", "model")
# The weight files of a save_pretrained directory, in the order they are looked for.
PRETRAINED_FILES = ("model.safetensors", "pytorch_model.bin")


def state_of(item: Any, where: str = "checkpoint") -> Params:
    """A state dict (parameters + buffers) from a module, a state dict, a file path (saved with
    ``torch.save`` or a ``.safetensors`` file), a ``save_pretrained`` directory, or a dict
    nesting the state under one of ``STATE_KEYS``."""
    if isinstance(item, nn.Module):
        return {k: v.detach().clone() for k, v in item.state_dict().items()}
    if isinstance(item, (str, Path)):
        path = Path(item)
        if path.is_dir():
            return read_pretrained(path, where)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: no checkpoint file at {path}")
        if path.suffix == ".safetensors":
            return _read_weights(path, f"{where} ({path})")
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


def read_pretrained(directory: str | Path, where: str = "checkpoint") -> Params:
    """The state dict in a directory written by Hugging Face's ``save_pretrained``:
    ``model.safetensors`` (read with the ``safetensors`` package) or ``pytorch_model.bin``, or
    the shards their ``.index.json`` lists."""
    directory = Path(directory)
    for name in PRETRAINED_FILES:
        index = directory / f"{name}.index.json"
        if (directory / name).is_file():
            files = [directory / name]
        elif index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            files = [directory / f for f in sorted(set(weight_map.values()))]
        else:
            continue
        state: Params = {}
        for file in files:
            state.update(_read_weights(file, f"{where} ({file})"))
        return state
    raise FileNotFoundError(
        f"{where}: {directory} is a directory without model.safetensors or pytorch_model.bin "
        "(the weights Hugging Face's save_pretrained writes, or their sharded .index.json); give "
        "the directory save_pretrained wrote, its model.safetensors, or a file saved with "
        "torch.save(model.state_dict(), path)")


def _read_weights(path: Path, where: str) -> Params:
    """One weight file: safetensors, or a torch-saved state dict."""
    if path.suffix != ".safetensors":
        return state_of(torch.load(path, map_location="cpu", weights_only=True), where)
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ImportError(f"{where}: reading model.safetensors needs the safetensors package "
                          "(pip install safetensors; transformers installs it)") from exc
    return dict(load_file(str(path), device="cpu"))


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
        elif any(k.startswith("model.") and k.removeprefix("model.") in expected
                 for k in unexpected):
            hint = (" The saved names carry a 'model.' prefix (a wrapper holding the network as "
                    "self.model, e.g. a Lightning module): save the inner network's state_dict(), "
                    "or strip the prefix: {k.removeprefix('model.'): v for k, v in "
                    "state.items()}.")
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
    states = [with_tied(state, model) for state in states]
    for i, state in enumerate(states):
        check_state(task, state, model, where=f"checkpoint {i}")
    return states


def with_tied(state: Params, model: nn.Module) -> Params:
    """``state`` with the names it lacks that are tied in ``model`` (one tensor under two
    names, e.g. a language model's output layer and its embedding) filled from the name it
    has: ``save_pretrained`` writes a tied tensor once."""
    full = model.state_dict()
    missing = [k for k in full if k not in state]
    if not missing:
        return state
    by_storage: dict[tuple[int, tuple[int, ...]], str] = {}
    for k, v in full.items():
        if k in state:
            by_storage.setdefault((v.data_ptr(), tuple(v.shape)), k)
    filled = dict(state)
    for k in missing:
        v = full[k]
        twin = by_storage.get((v.data_ptr(), tuple(v.shape))) if v.numel() else None
        if twin is not None:
            filled[k] = state[twin]
    return filled


__all__ = ["PRETRAINED_FILES", "STATE_KEYS", "as_checkpoints", "check_state", "read_pretrained",
           "state_of", "with_tied"]
