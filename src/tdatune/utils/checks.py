"""Input validation with messages that name the thing at fault and the fix."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch


def check_positive_lambdas(lambdas: torch.Tensor | Sequence[float] | float) -> torch.Tensor:
    """Return ``lambdas`` as a 1-D float64 tensor, refusing values that are not finite and > 0."""
    lam = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
    if lam.numel() == 0:
        raise ValueError("lambdas is empty: pass at least one damping value > 0")
    bad = ~torch.isfinite(lam) | (lam <= 0)
    if bool(bad.any()):
        value = lam[bad][0].item()
        raise ValueError(
            f"lambda must be a finite number > 0, got {value!r}; "
            "use a positive damping such as 1e-3 (a log grid spanning the spectrum works best)"
        )
    return lam


def check_open_unit(name: str, value: float) -> float:
    """Refuse ``value`` outside the open interval (0, 1)."""
    value = float(value)
    if not (0.0 < value < 1.0):
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    return value


def check_finite_rows(name: str, matrix: torch.Tensor, offset: int = 0) -> None:
    """Refuse a matrix with NaN/inf, naming the first offending row (example index)."""
    rows = matrix.reshape(matrix.shape[0], -1)
    # Fast path: a row sum is finite unless the row holds NaN/inf (or overflows, which is
    # just as much a sign of divergence). Only on failure find the exact row.
    if bool(torch.isfinite(rows.sum(dim=1)).all()):
        return
    finite = torch.isfinite(rows).all(dim=1) & torch.isfinite(rows.sum(dim=1))
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0]) + offset
        raise ValueError(
            f"{name} has non-finite values (NaN or inf) for example {row}; "
            "check the model's outputs and loss for that example (a diverged model or a "
            "probability of exactly 0 or 1 under the chosen output function)"
        )


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Refuse ``tensor`` whose shape differs from ``expected`` (None matches any size)."""
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected) and all(
        e is None or s == e for s, e in zip(shape, expected, strict=True)
    )
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(shape)}")


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Refuse ``value`` that is not one of ``choices``, listing them."""
    options = list(choices)
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(options)}")
    return value


# ---------------------------------------------------------------- data checks

def _named_leaves(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in a tensor or a tuple / list / dict tree of them."""
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in _named_leaves(v, f"{prefix}[{k!r}]")]
    if isinstance(tree, list | tuple):
        return [leaf for i, v in enumerate(tree) for leaf in _named_leaves(v, f"{prefix}[{i}]")]
    return []


class NonFiniteExample(ValueError):
    """NaN or inf in a dataset's inputs or targets: ``where`` (e.g. ``inputs['pixels']``)
    and the example ``row``. :meth:`in_split` says which split holds them."""

    def __init__(self, where: str, row: int, split: str | None = None) -> None:
        self.where, self.row, self.split = where, row, split
        said = f"the {split}: " if split else ""
        super().__init__(
            f"{said}{where} holds NaN or inf for example {row}; repair or drop that example "
            "(e.g. impute missing features) before training or attributing")

    def in_split(self, split: str) -> NonFiniteExample:
        """The same refusal, naming the split (``training data``, ``validation set``, ...)."""
        return NonFiniteExample(self.where, self.row, split)

    def __reduce__(self) -> tuple[type, tuple[str, int, str | None]]:
        # pickles (a process or Ray worker's error) with its fields, not only its message
        return NonFiniteExample, (self.where, self.row, self.split)


def check_finite_examples(name: str, data: Any) -> None:
    """Refuse NaN or inf in any floating tensor of ``data`` (a tensor or a tree of tensors
    with a leading example axis), naming the first offending example
    (:class:`NonFiniteExample`, a ``ValueError``)."""
    for path, tensor in _named_leaves(data):
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
            continue
        # Fast path, one pass and no large temporary: the sum is finite unless some value is
        # NaN/inf (or the sum overflows; the exact check below then finds nothing).
        if bool(torch.isfinite(tensor.sum())):
            continue
        rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() else tensor.reshape(1, 1)
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            raise NonFiniteExample(f"{name}{path}", int((~finite).nonzero()[0, 0]))


def check_nonempty(name: str, n: int, fix: str) -> None:
    """Refuse a split or subset of ``n`` == 0 examples where examples are needed."""
    if n < 1:
        raise ValueError(f"{name} is empty (0 examples); {fix}")


def check_class_targets(name: str, targets: torch.Tensor, num_classes: int) -> None:
    """Refuse class labels that are not integers or lie outside ``0..num_classes-1``, naming
    the first offending example (-100, cross-entropy's ignored index, is accepted)."""
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(
            f"{name} must be integer class indices (int64), got {targets.dtype}; convert them "
            "with targets.long() (float labels are not class indices)"
        )
    if targets.numel() == 0:
        return
    flat = targets.reshape(targets.shape[0], -1) if targets.dim() else targets.reshape(1, 1)
    bad = ((flat < 0) & (flat != -100)) | (flat >= num_classes)
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0, 0])
        value = int(flat[row][bad[row]][0])
        raise ValueError(
            f"{name}: label {value} of example {row} is out of range for a model with "
            f"{num_classes} classes (valid 0..{num_classes - 1}); fix the labels or give the "
            "model as many outputs as there are classes"
        )

