"""Batches as small trees of tensors: a tensor, a tuple/list of trees, or a dict of trees, every
tensor with a leading example axis. The helpers below index, slice, move and describe such
trees, so the rest of the package treats ``x`` (what the model is called on) and ``y`` (what the
loss and the output see with the model's outputs) alike whatever their structure."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

Tree = Any  # torch.Tensor | tuple[Tree, ...] | list[Tree] | dict[str, Tree]


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Tree) -> Tree:
    """Apply ``fn`` to every tensor of ``tree``, keeping its structure."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(tree_map(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    raise TypeError(f"a batch may hold tensors, tuples, lists and dicts of them, found "
                    f"{type(tree).__name__}; convert it to a torch tensor")


def leaves(tree: Tree) -> list[torch.Tensor]:
    """The tensors of ``tree`` in a fixed order (dict keys in insertion order)."""
    out: list[torch.Tensor] = []
    tree_map(out.append, tree)
    return out


def as_tensor_tree(tree: Tree) -> Tree:
    """``tree`` with numpy arrays (and nested sequences of them) turned into tensors."""
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(tree))
    if isinstance(tree, Mapping):
        return {k: as_tensor_tree(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)) and not hasattr(tree, "_fields"):
        return type(tree)(as_tensor_tree(v) for v in tree)
    return tree


def batch_len(tree: Tree, what: str = "batch") -> int:
    """The common leading size of every tensor in ``tree``; refuses trees that disagree."""
    sizes = {}
    for t in leaves(tree):
        if t.dim() == 0:
            raise ValueError(f"{what} holds a 0-d tensor; every tensor needs a leading example "
                             "axis (one row per example)")
        sizes[int(t.shape[0])] = tuple(t.shape)
    if not sizes:
        raise ValueError(f"{what} holds no tensors")
    if len(sizes) > 1:
        raise ValueError(f"the tensors of {what} disagree on the number of examples: "
                         f"{describe(tree)}; every tensor needs one row per example")
    return next(iter(sizes))


def tree_index(tree: Tree, index: torch.Tensor) -> Tree:
    """Rows ``index`` (long index or boolean mask) of every tensor."""
    return tree_map(lambda t: t[index.to(t.device)], tree)


def tree_slice(tree: Tree, start: int, stop: int) -> Tree:
    """Rows ``start:stop`` of every tensor (views)."""
    return tree_map(lambda t: t[start:stop], tree)


def tree_to(tree: Tree, device: torch.device | str) -> Tree:
    """Every tensor moved to ``device`` (no copy when already there)."""
    return tree_map(lambda t: t.to(device), tree)


def tree_cat(trees: list[Tree]) -> Tree:
    """Concatenate trees of one structure along the example axis."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(trees)
    if isinstance(first, Mapping):
        return {k: tree_cat([t[k] for t in trees]) for k in first}
    return type(first)(tree_cat([t[i] for t in trees]) for i in range(len(first)))


def describe(tree: Tree) -> str:
    """A short structural description, e.g. ``{input_ids: int64[8, 16], labels: int64[8]}``."""
    if isinstance(tree, torch.Tensor):
        return f"{str(tree.dtype).removeprefix('torch.')}{list(tree.shape)}"
    if isinstance(tree, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in tree.items()) + "}"
    if isinstance(tree, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in tree) + ")"
    return type(tree).__name__
