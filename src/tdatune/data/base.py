"""Tensor data containers (any batch structure), conversion of user data (tensors, Datasets,
DataLoaders) into them, and deterministic, seeded train / validation / test splits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from tdatune.data.batches import (
    Tree,
    as_tensor_tree,
    batch_len,
    describe,
    leaves,
    tree_cat,
    tree_index,
    tree_map,
    tree_slice,
    tree_to,
)
from tdatune.data.streaming import StreamingDataset, stream_dataset
from tdatune.utils.checks import NonFiniteExample, check_finite_examples
from tdatune.utils.fingerprint import fingerprint_config, fingerprint_tensors


@dataclass(frozen=True)
class ArrayDataset:
    """Examples held as tensors; row i of every tensor is example i.

    ``inputs`` is what the model is called on and ``targets`` what the loss and the output
    function see next to the model's outputs. Each is a tensor or a tree of tensors (tuple,
    list or dict, e.g. ``{"input_ids": ..., "attention_mask": ...}``), every tensor with a
    leading example axis. With ``targets=None`` the inputs are the whole batch and the loss and
    output see that batch (``targets`` then returns the inputs themselves, not a copy).

    Built-in classification: ``inputs`` float [n, ...], ``targets`` int64 [n]. Sequences:
    ``inputs`` int64 tokens [n, T], ``targets`` int64 next tokens [n, T].

    It is also a map-style ``torch.utils.data.Dataset``: ``data[i]`` is example i as
    ``(x_i, y_i)`` (or the whole-batch tree's row i), so ``DataLoader(data, batch_size=32)``
    gives back batches of the same form, e.g. inside your own training function.
    """

    inputs: Tree
    targets: Tree = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", as_tensor_tree(self.inputs))
        n = batch_len(self.inputs, "inputs")
        check_finite_examples("inputs", self.inputs)
        if self.targets is None:
            object.__setattr__(self, "targets", self.inputs)
            return
        object.__setattr__(self, "targets", as_tensor_tree(self.targets))
        m = batch_len(self.targets, "targets")
        check_finite_examples("targets", self.targets)
        if n != m:
            raise ValueError(
                f"inputs and targets disagree on the number of examples: {n} vs {m}"
            )

    @property
    def whole_batch(self) -> bool:
        """True when the loss and output see the whole batch (no separate targets)."""
        return self.targets is self.inputs

    @property
    def is_tensor_pair(self) -> bool:
        """True for plain tensor inputs with separate tensor targets (the built-in form)."""
        return (isinstance(self.inputs, torch.Tensor) and isinstance(self.targets, torch.Tensor)
                and not self.whole_batch)

    def __len__(self) -> int:
        if isinstance(self.inputs, torch.Tensor):
            return int(self.inputs.shape[0])
        return batch_len(self.inputs, "inputs")

    def __getitem__(self, i: int) -> Tree:
        """Example ``i``: ``(x_i, y_i)``, or row ``i`` of the whole batch."""
        if self.whole_batch:
            return tree_map(lambda t: t[i], self.inputs)
        return tree_map(lambda t: t[i], self.inputs), tree_map(lambda t: t[i], self.targets)

    def _new(self, fn: Callable[[Tree], Tree]) -> ArrayDataset:
        if self.whole_batch:
            return ArrayDataset(fn(self.inputs))
        return ArrayDataset(fn(self.inputs), fn(self.targets))

    def subset(self, index: torch.Tensor | list[int]) -> ArrayDataset:
        """The examples at ``index`` (a long index or a boolean mask)."""
        idx = torch.as_tensor(index)
        if idx.numel() == 0 or (idx.dtype == torch.bool and not bool(idx.any())):
            raise ValueError("ArrayDataset.subset got an empty index (no examples selected); "
                             "pass at least one example index or a mask with a True entry")
        if idx.is_floating_point():
            raise ValueError(f"ArrayDataset.subset needs integer indices or a boolean mask, got "
                             f"{idx.dtype}; convert with index.long()")
        return self._new(lambda t: tree_index(t, idx))

    def slice(self, start: int, stop: int) -> ArrayDataset:
        """Examples ``start:stop`` (views, no copy)."""
        return self._new(lambda t: tree_slice(t, start, stop))

    def fingerprint(self) -> str:
        """Content hash of inputs and targets (cache keys, manifests, stale-result checks)."""
        if self.is_tensor_pair:  # the historical form: keeps existing fingerprints valid
            return fingerprint_tensors(self.inputs, self.targets)
        parts = leaves(self.inputs) + ([] if self.whole_batch else leaves(self.targets))
        return fingerprint_tensors(*parts) + ":" + fingerprint_config(
            [describe(self.inputs), None if self.whole_batch else describe(self.targets)])

    def batches(self, size: int, device: torch.device | str = "cpu"
                ) -> Iterator[tuple[int, Tree, Tree]]:
        """``(start, inputs, targets)`` of consecutive pieces of at most ``size`` examples,
        moved to ``device``."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        for start in range(0, len(self), size):
            x = tree_to(tree_slice(self.inputs, start, start + size), device)
            y = x if self.whole_batch else tree_to(
                tree_slice(self.targets, start, start + size), device)
            yield start, x, y

    def num_batches(self, size: int) -> int:
        """How many pieces :meth:`batches` yields."""
        return -(-len(self) // size)

    def to(self, device: torch.device | str) -> ArrayDataset:
        """A copy on ``device``."""
        return self._new(lambda t: tree_to(t, device))

    def describe(self) -> str:
        """The structure of one batch, e.g. ``inputs float32[n, 64], targets int64[n]``."""
        if self.whole_batch:
            return f"whole batch {describe(self.inputs)}"
        return f"inputs {describe(self.inputs)}, targets {describe(self.targets)}"


def as_dataset(data: Any, targets: Any = None, *, pairs: bool = True,
               stream: bool = False) -> ArrayDataset | StreamingDataset:
    """Turn what a user has into an :class:`ArrayDataset` (collated into tensors, in index order).

    Accepted: an ``ArrayDataset``; tensors or numpy arrays ``(inputs, targets)`` (as two
    arguments or a 2-tuple); one tensor or a dict of tensors (a whole batch); a map-style
    ``torch.utils.data.Dataset``; a ``DataLoader`` (its dataset and ``collate_fn`` are used, in
    index order, so shuffling and batch size do not matter). Examples that are 2-tuples
    ``(x, y)`` become inputs ``x`` and targets ``y`` (``pairs=False`` keeps the whole tuple as
    one batch); anything else (a dict such as ``{"input_ids", "attention_mask", "labels"}``, a
    longer tuple, a tensor) is a whole batch that the loss and output also see.

    ``stream=True`` turns a map-style ``Dataset`` or a ``DataLoader`` over one into a
    :class:`~tdatune.data.streaming.StreamingDataset` instead: nothing is collated up front,
    batches are read and collated (padded) one at a time when gradients are computed. Data
    already in tensors is returned as an ``ArrayDataset`` either way; a ``StreamingDataset``
    given without ``stream=True`` is collated whole with its own collate function.
    """
    if isinstance(data, ArrayDataset):
        return data
    if isinstance(data, StreamingDataset):
        if stream:
            return data
        tree = _collate_dataset(data, data.collate)
        return _as_array_dataset(tree, data.pairs)
    if (isinstance(data, DataLoader) and isinstance(data.dataset, ArrayDataset)
            and data.collate_fn is default_collate):
        return data.dataset  # already tensors: no per-example round trip
    if stream and targets is None and isinstance(data, (Dataset, DataLoader)):
        return stream_dataset(data, pairs=pairs)
    if targets is not None:
        return ArrayDataset(data, targets)
    if isinstance(data, DataLoader):
        tree = _collate_loader(data)
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                       and not isinstance(data, (torch.Tensor, np.ndarray,
                                                                 tuple, list, dict))):
        tree = _collate_dataset(data, default_collate)
    else:
        tree = as_tensor_tree(data)
    return _as_array_dataset(tree, pairs)


def as_split(data: Any, split: str) -> ArrayDataset | StreamingDataset:
    """:func:`as_dataset` for one split of a problem (``training data``, ``validation set``,
    ``explained examples``, ...): a refusal of NaN or inf names the split and the example."""
    try:
        return as_dataset(data)
    except NonFiniteExample as exc:
        raise exc.in_split(split) from None


def _as_array_dataset(tree: Tree, pairs: bool) -> ArrayDataset:
    """Inputs and targets from a collated 2-tuple (with ``pairs``), else a whole batch."""
    if pairs and isinstance(tree, (tuple, list)) and len(tree) == 2:
        return ArrayDataset(tree[0], tree[1])
    if isinstance(tree, list):
        tree = tuple(tree)
    return ArrayDataset(tree)


def _collate_dataset(dataset: Any, collate: Callable[[list[Any]], Any]) -> Tree:
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty; attribution needs at least one example")
    try:
        # One call over every example: a padding collate_fn then pads to one common length.
        return as_tensor_tree(collate([dataset[i] for i in range(n)]))
    except (TypeError, RuntimeError) as exc:
        raise ValueError(
            f"could not collate the examples of {type(dataset).__name__} into tensors ({exc}); "
            "each example must be a tensor, a tuple or a dict of tensors of one shape, or give a "
            "DataLoader whose collate_fn pads them"
        ) from exc


def _collate_loader(loader: DataLoader) -> Tree:
    if not isinstance(loader.dataset, IterableDataset):
        return _collate_dataset(loader.dataset, loader.collate_fn)
    parts = [as_tensor_tree(b) for b in loader]
    if not parts:
        raise ValueError("the DataLoader yielded no batches")
    return tree_cat(parts)


@dataclass(frozen=True)
class Splits:
    """Train / validation / test data of one setting plus where it came from."""

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    name: str
    source: str  # e.g. "real: scikit-learn digits" or "stand-in: Fashion-MNIST for CIFAR-2"
    num_classes: int
    info: dict[str, object] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def make_splits(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    name: str,
    source: str,
    num_classes: int,
) -> Splits:
    """Shuffle with ``seed`` and cut into disjoint train / val / test of the given sizes."""
    n = int(inputs.shape[0])
    need = n_train + n_val + n_test
    if min(n_train, n_val, n_test) < 0 or n_train == 0:
        raise ValueError(f"split sizes must be >= 0 with n_train > 0, got {n_train}/{n_val}/{n_test}")
    if need > n:
        raise ValueError(
            f"{name}: asked for {n_train} train + {n_val} val + {n_test} test = {need} examples, "
            f"but the data has only {n}; lower the sizes"
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    full = ArrayDataset(inputs, targets)
    cuts = [0, n_train, n_train + n_val, need]
    # _new, not subset: a validation or test split may be empty here (refused where used).
    parts = [full._new(lambda t, i=perm[a:b]: tree_index(t, i)) for a, b in pairwise(cuts)]
    return Splits(*parts, name=name, source=source, num_classes=num_classes)
