"""Tensor data containers and deterministic, seeded train / validation / test splits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise

import torch

from tdatune.utils.checks import check_finite_examples
from tdatune.utils.fingerprint import fingerprint_tensors


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs and targets held as tensors; row i is example i.

    Classification: ``inputs`` float [n, ...], ``targets`` int64 [n].
    Sequences: ``inputs`` int64 tokens [n, T], ``targets`` int64 next tokens [n, T].
    """

    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        check_finite_examples("inputs", self.inputs)
        check_finite_examples("targets", self.targets)
        if self.inputs.shape[0] != self.targets.shape[0]:
            raise ValueError(
                f"inputs and targets disagree on the number of examples: "
                f"{self.inputs.shape[0]} vs {self.targets.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, index: torch.Tensor | list[int]) -> ArrayDataset:
        """The examples at ``index`` (a long index or a boolean mask)."""
        idx = torch.as_tensor(index)
        if idx.numel() == 0 or (idx.dtype == torch.bool and not bool(idx.any())):
            raise ValueError("ArrayDataset.subset got an empty index (no examples selected); "
                             "pass at least one example index or a mask with a True entry")
        if idx.is_floating_point():
            raise ValueError(f"ArrayDataset.subset needs integer indices or a boolean mask, got "
                             f"{idx.dtype}; convert with index.long()")
        return ArrayDataset(self.inputs[idx], self.targets[idx])

    def fingerprint(self) -> str:
        """Content hash of inputs and targets (cache keys, manifests, stale-result checks)."""
        return fingerprint_tensors(self.inputs, self.targets)

    def batches(self, size: int, device: torch.device | str = "cpu"
                ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(start, inputs, targets)`` of consecutive pieces of at most ``size`` examples,
        moved to ``device``."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        for start in range(0, len(self), size):
            yield (start, self.inputs[start : start + size].to(device),
                   self.targets[start : start + size].to(device))

    def num_batches(self, size: int) -> int:
        """How many pieces :meth:`batches` yields."""
        return -(-len(self) // size)

    def to(self, device: torch.device | str) -> ArrayDataset:
        """A copy on ``device``."""
        return ArrayDataset(self.inputs.to(device), self.targets.to(device))


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
    parts = [full.subset(perm[a:b]) for a, b in pairwise(cuts)]
    return Splits(*parts, name=name, source=source, num_classes=num_classes)
