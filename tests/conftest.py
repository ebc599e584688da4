"""Shared fixtures: small real data (digits) and quiet progress bars."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TDATUNE_NO_PROGRESS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits_small():
    """Digits splits with 120 train / 30 val / 40 test examples."""
    from tdatune.data.digits import load_digits_splits

    return load_digits_splits(n_train=120, n_val=30, n_test=40, seed=1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small problems: one thread is as fast and immune to oversubscription on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
