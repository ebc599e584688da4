"""ArrayDataset helpers against hand-worked expectations."""

from __future__ import annotations

import pytest
import torch

from tdatune.data.base import ArrayDataset


def test_batches_cover_every_example_once_in_order():
    data = ArrayDataset(torch.arange(10.0).reshape(10, 1), torch.arange(10))
    pieces = list(data.batches(4))
    assert [start for start, _, _ in pieces] == [0, 4, 8]
    assert [len(y) for _, _, y in pieces] == [4, 4, 2]
    assert data.num_batches(4) == 3 and data.num_batches(5) == 2
    assert torch.equal(torch.cat([x for _, x, _ in pieces]), data.inputs)
    assert torch.equal(torch.cat([y for _, _, y in pieces]), data.targets)


def test_batches_refuse_a_size_below_one():
    data = ArrayDataset(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        next(data.batches(0))
