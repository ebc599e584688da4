"""Label noise with a known answer: flip a seeded fraction of a classification set's labels
(its targets, or the ``labels`` of a Hugging Face dict batch), each to another class drawn
uniformly, and say which were flipped (mislabel detection)."""

from __future__ import annotations

import torch

from tdatune.data.base import ArrayDataset


def flip_labels(data: ArrayDataset, fraction: float, num_classes: int, seed: int = 0
                ) -> tuple[ArrayDataset, torch.Tensor]:
    """``data`` with round(fraction * n) labels flipped, and the flipped indices (sorted).

    Each flipped label becomes one of the other ``num_classes - 1`` classes, uniformly; the
    draw depends only on ``seed``, n and the fraction."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the flipped fraction must be in (0, 1), got {fraction}")
    hf = data.whole_batch and isinstance(data.inputs, dict) and "labels" in data.inputs
    y = data.inputs["labels"] if hf else data.targets  # a Hugging Face batch carries its labels
    if ((data.whole_batch and not hf) or not torch.is_tensor(y) or y.dim() != 1
            or y.is_floating_point() or y.is_complex()):
        raise ValueError("label flips need a classification set: integer targets, one per "
                         "example, or a dict batch with integer `labels` (got "
                         f"{data.describe()})")
    if num_classes < 2:
        raise ValueError(f"label flips need at least 2 classes, got {num_classes}")
    n = len(data)
    k = round(fraction * n)
    if k < 1:
        raise ValueError(f"a fraction of {fraction} of {n} examples flips no label")
    gen = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(n, generator=gen)[:k].sort().values
    shift = torch.randint(1, num_classes, (k,), generator=gen)
    new = y.clone()
    new[flipped] = (y[flipped] + shift.to(y.dtype)) % num_classes
    if hf:
        return ArrayDataset({**data.inputs, "labels": new}), flipped
    return ArrayDataset(data.inputs, new), flipped
