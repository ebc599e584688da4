"""Examples read batch by batch from a map-style ``Dataset`` (or a ``DataLoader`` over one),
collated per batch and never held whole: for data sets larger than memory, and for padding
collates that should pad each batch to its own longest example.

:class:`StreamingDataset` offers the part of :class:`~tdatune.data.base.ArrayDataset` that
featurization uses (``len``, ``batches``, ``num_batches``, ``slice``, ``fingerprint``,
``whole_batch``), so :func:`~tdatune.features.gradients.per_example_grads`,
:func:`~tdatune.features.gradients.iter_per_example_grads` and
:func:`~tdatune.features.store.build_gradient_store` take it unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
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
    tree_slice,
    tree_to,
)
from tdatune.utils.fingerprint import fingerprint_config, fingerprint_tensors

Collate = Callable[[list[Any]], Any]
Index = range | torch.Tensor
FINGERPRINT_BLOCK = 256  # examples read per step of the fingerprint pass


class StreamingDataset:
    """The examples of a map-style ``dataset`` in index order, collated ``size`` at a time.

    ``batches(size, device)`` yields ``(start, x, y)`` like ``ArrayDataset.batches``: it reads
    ``dataset[i]`` for one batch of indices, calls ``collate`` on that list (so a padding
    collate pads each batch to its own longest example), moves the result to ``device`` and
    drops it before reading the next batch. At most one batch is held (``num_workers=0``; with
    worker processes a ``DataLoader`` prefetches ``2 * num_workers`` more). Examples that
    collate to a 2-tuple ``(x, y)`` are inputs and targets (``pairs=False`` keeps the tuple as
    one batch); anything else (a dict, a longer tuple, a tensor) is a whole batch that the loss
    and output also see, as in :func:`~tdatune.data.base.as_dataset`.

    ``slice`` and ``subset`` are lazy views over index ranges. ``fingerprint()`` reads every
    example once (see its cost there) unless ``fingerprint=`` vouches for the content.
    """

    def __init__(self, dataset: Any, collate: Collate | None = None, *, pairs: bool = True,
                 num_workers: int = 0, fingerprint: str | None = None,
                 index: Index | None = None) -> None:
        if isinstance(dataset, IterableDataset) or not (
                hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                f"streaming needs a map-style dataset (__getitem__ and __len__, read by index), "
                f"got {type(dataset).__name__}; an IterableDataset has no stable index, so "
                "collate it once with as_dataset(...) or wrap its examples in a map-style Dataset")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.collate: Collate = collate if collate is not None else default_collate
        self.pairs = bool(pairs)
        self.num_workers = int(num_workers)
        self._given = fingerprint
        self._index: Index = range(len(dataset)) if index is None else index
        self._fingerprint: str | None = None
        self._whole: bool | None = None

    # ------------------------------------------------------------------ views
    def _view(self, index: Index) -> StreamingDataset:
        view = StreamingDataset(self.dataset, self.collate, pairs=self.pairs,
                                num_workers=self.num_workers, fingerprint=self._given,
                                index=index)
        view._whole = self._whole
        return view

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Any:
        """Example ``i`` of this view as the wrapped dataset gives it (not collated)."""
        return self.dataset[int(self._index[i])]

    def slice(self, start: int, stop: int) -> StreamingDataset:
        """Examples ``start:stop`` of this view (lazy: nothing is read)."""
        return self._view(self._index[start:stop])

    def subset(self, index: torch.Tensor | Sequence[int]) -> StreamingDataset:
        """The examples at ``index`` (a long index or a boolean mask), lazily."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError("StreamingDataset.subset got an empty index (no examples "
                             "selected); pass at least one example index or a mask with a True "
                             "entry")
        if idx.is_floating_point():
            raise ValueError(f"StreamingDataset.subset needs integer indices or a boolean "
                             f"mask, got {idx.dtype}; convert with index.long()")
        idx, n = idx.long(), len(self)
        if bool(((idx < -n) | (idx >= n)).any()):
            raise IndexError(f"subset index out of range for {n} examples")
        own = self._index
        if isinstance(own, range):  # step 1: position i is dataset index start + i
            return self._view(idx % n + own.start)
        return self._view(own[idx])

    def _ids(self, start: int, stop: int) -> list[int]:
        """Dataset indices of positions ``start:stop`` of this view."""
        part = self._index[start:stop]
        return list(part) if isinstance(part, range) else part.tolist()

    # ------------------------------------------------------------------ reading
    def _read(self, size: int, collate: Collate) -> Iterator[tuple[int, Any]]:
        """``(start, collate(items))`` for consecutive pieces of ``size`` examples."""
        starts = range(0, len(self), size)
        if self.num_workers == 0:
            for start in starts:
                ids = self._ids(start, start + size)
                yield start, self._call(collate, [self.dataset[i] for i in ids], start)
            return
        loader = DataLoader(self.dataset, batch_sampler=_Pieces(self, size),
                            collate_fn=collate, num_workers=self.num_workers)
        yield from zip(starts, loader, strict=True)

    def _call(self, collate: Collate, items: list[Any], start: int) -> Any:
        try:
            return collate(items)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(
                f"could not collate examples {start}..{start + len(items) - 1} of "
                f"{type(self.dataset).__name__} into tensors ({exc}); each example must be a "
                "tensor, a tuple or a dict of tensors of one shape, or give a collate function "
                "(a DataLoader's collate_fn) that pads them") from exc

    def _split(self, tree: Tree) -> tuple[Tree, Tree | None]:
        """``(inputs, targets)``, or ``(batch, None)`` for a whole batch."""
        if self.pairs and isinstance(tree, (tuple, list)) and len(tree) == 2 and not hasattr(
                tree, "_fields"):
            return tree[0], tree[1]
        return (tuple(tree) if isinstance(tree, list) else tree), None

    def _batch(self, start: int, raw: Any, rows: int) -> tuple[Tree, Tree | None]:
        tree = as_tensor_tree(raw)
        got = batch_len(tree, f"the collated batch of examples {start}..{start + rows - 1}")
        if got != rows:
            raise ValueError(f"the collate function returned {got} rows for the {rows} examples "
                             f"{start}..{start + rows - 1}; it must keep one row per example")
        _check_finite(tree, start)
        return self._split(tree)

    def batches(self, size: int, device: torch.device | str = "cpu"
                ) -> Iterator[tuple[int, Tree, Tree]]:
        """``(start, inputs, targets)`` of consecutive pieces of at most ``size`` examples in
        index order, each collated on its own and moved to ``device`` (for a whole batch,
        ``targets`` is the inputs themselves)."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        n = len(self)
        for start, raw in self._read(size, self.collate):
            x, y = self._batch(start, raw, min(size, n - start))
            self._whole = y is None
            x = tree_to(x, device)
            yield start, x, (x if y is None else tree_to(y, device))

    def num_batches(self, size: int) -> int:
        """How many pieces :meth:`batches` yields."""
        return -(-len(self) // size)

    @property
    def whole_batch(self) -> bool:
        """True when the loss and output see the whole batch (no separate targets); decided
        by collating the first example."""
        if self._whole is None:
            if len(self) == 0:
                raise ValueError("the dataset is empty; attribution needs at least one example")
            raw = self._call(self.collate, [self[0]], 0)
            self._whole = self._split(as_tensor_tree(raw))[1] is None
        return self._whole

    @property
    def is_tensor_pair(self) -> bool:
        """Always False: a stream has no in-memory tensors to take fast paths on."""
        return False

    @property
    def inputs(self) -> Tree:
        """Not available: a stream holds no tensors."""
        raise AttributeError(_NO_TENSORS)

    @property
    def targets(self) -> Tree:
        """Not available: a stream holds no tensors."""
        raise AttributeError(_NO_TENSORS)

    def describe(self) -> str:
        """The form of one batch (from the first example), e.g. ``streamed inputs
        float32[1, 784], targets int64[1]``."""
        raw = self._call(self.collate, [self[0]], 0)
        x, y = self._split(as_tensor_tree(raw))
        if y is None:
            return f"streamed whole batch {describe(x)}"
        return f"streamed inputs {describe(x)}, targets {describe(y)}"

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """Content hash of the examples, the same whatever the batch size or padding.

        What is hashed: each example collated on its own (``collate([dataset[i]])``, so a
        padding collate adds no padding), the shapes, dtypes and bytes of its tensors. With
        ``default_collate``, which stacks without padding, a block of examples is collated at
        once and hashed row by row (the same bytes).

        Cost: one pass over this view's examples, on the first call only (the result is kept):
        one ``__getitem__`` per example, plus one collate call per example with a custom
        collate. That is reading the data once, which for cheap gradients is not negligible
        (``bench/streaming.py``: 1,000,000 examples of 784 floats made on the fly, 15 s,
        against about 45 s to featurize them with a per-layer projection and half an hour
        with a dense Gaussian one).
        Pass ``fingerprint=`` (e.g. a data version) when constructing to vouch for the
        content and skip the pass.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        if self._given is not None:
            where = ([self._index.start, self._index.stop] if isinstance(self._index, range)
                     else fingerprint_tensors(self._index))
            self._fingerprint = fingerprint_config(["stream", self._given, where, self.pairs])
            return self._fingerprint
        digest = hashlib.sha256(f"stream|pairs={self.pairs}|n={len(self)}|".encode())
        structure = None
        for start, (stacked, raw) in self._read(FINGERPRINT_BLOCK, _EachAlone(self.collate)):
            trees = [as_tensor_tree(raw)] if stacked else [as_tensor_tree(one) for one in raw]
            for offset, tree in zip(range(start, start + len(trees)), trees, strict=True):
                _check_finite(tree, offset)
            if structure is None:
                structure = describe(tree_slice(trees[0], 0, 1) if stacked else trees[0])
                digest.update(structure.encode())
            if not stacked:
                for tree in trees:
                    for t in leaves(tree):
                        digest.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
                        digest.update(_raw_bytes(t))
                continue
            rows = batch_len(trees[0])
            parts = [(f"{(1, *t.shape[1:])}|{t.dtype}|".encode(), _raw_bytes(t),
                      t[:1].numel() * t.element_size()) for t in leaves(trees[0])]
            for r in range(rows):  # row r: the bytes example r collated alone would have
                for head, data, size in parts:
                    digest.update(head)
                    digest.update(data[r * size : (r + 1) * size])
        self._fingerprint = digest.hexdigest()[:16] + ":stream"
        return self._fingerprint


_NO_TENSORS = ("a StreamingDataset reads its examples batch by batch and holds no tensors; use "
               "batches(size) to read them, or collate the data into memory with "
               "as_dataset(...) (without stream=True) where a code path needs all of them")


class _EachAlone:
    """``(True, default_collate(items))`` when the collate is ``default_collate`` (it stacks
    without padding: row i is example i collated alone) and the items stack, else
    ``(False, [collate([item]) for item in items])``. Picklable for worker processes."""

    def __init__(self, collate: Collate) -> None:
        self.collate = collate

    def __call__(self, items: list[Any]) -> tuple[bool, Any]:
        if self.collate is default_collate:
            try:
                return True, default_collate(items)
            except (TypeError, RuntimeError):
                pass  # ragged examples: each alone, as any other collate
        return False, [self.collate([item]) for item in items]


class _Pieces:
    """Batch sampler: the dataset indices of consecutive pieces of a view, in order."""

    def __init__(self, data: StreamingDataset, size: int) -> None:
        self.data, self.size = data, size

    def __len__(self) -> int:
        return self.data.num_batches(self.size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.data), self.size):
            yield self.data._ids(start, start + self.size)


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a tensor of any dtype (bfloat16 and bool included), in C order."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _check_finite(tree: Tree, start: int) -> None:
    """Refuse NaN or inf in a floating tensor of a batch, naming the example."""
    for t in leaves(tree):
        if not t.is_floating_point() or t.numel() == 0 or bool(torch.isfinite(t.sum())):
            continue
        bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            row = start + int(bad.nonzero()[0, 0])
            raise ValueError(f"example {row} holds NaN or inf; repair or drop that example "
                             "(e.g. impute missing features) before attributing")


def stream_dataset(data: Any, collate: Collate | None = None, *, pairs: bool = True,
                   num_workers: int = 0, fingerprint: str | None = None) -> StreamingDataset:
    """A :class:`StreamingDataset` over a map-style ``Dataset`` or a ``DataLoader`` over one.

    A ``DataLoader`` contributes its dataset and ``collate_fn`` (unless ``collate`` is given);
    its shuffling, batch size and workers do not matter: examples come in index order, in
    pieces of the size the reader asks for, collated per piece.
    """
    if isinstance(data, StreamingDataset):
        return data
    if isinstance(data, DataLoader):
        if collate is None and data.collate_fn is not default_collate:
            collate = data.collate_fn
        data = data.dataset
    if not isinstance(data, Dataset) and isinstance(data, (torch.Tensor, np.ndarray, tuple,
                                                           list, dict)):
        raise TypeError(f"streaming reads a map-style Dataset or a DataLoader, got "
                        f"{type(data).__name__}; tensors are already in memory: use "
                        "as_dataset(...) without stream=True")
    return StreamingDataset(data, collate, pairs=pairs, num_workers=num_workers,
                            fingerprint=fingerprint)


__all__ = ["StreamingDataset", "stream_dataset"]
