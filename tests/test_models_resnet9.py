"""ResNet-9: shapes, width, eval-mode per-example gradients, pickling."""

from __future__ import annotations

import pickle
from functools import partial

import pytest
import torch

from tdatune.data.base import ArrayDataset
from tdatune.features.gradients import num_params, per_example_grads
from tdatune.models.resnet9 import ResNet9
from tdatune.models.task import Task, model_params


def test_forward_shapes():
    torch.manual_seed(0)
    model = ResNet9(num_classes=2, width=4)
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 2)
    assert ResNet9(10, width=2, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.randn(5, 3 * 32 * 32))


def test_width_scales_parameters():
    small = sum(p.numel() for p in ResNet9(2, width=4).parameters())
    canonical = sum(p.numel() for p in ResNet9(2, width=64).parameters())
    assert canonical > 6_000_000 and small < canonical / 100


def test_eval_mode_gradients_are_per_example():
    torch.manual_seed(0)
    task = Task(make_model=partial(ResNet9, 2, 4))
    model = task.make_model()
    model.train()
    model(torch.randn(16, 3, 32, 32))  # move the BatchNorm statistics off their defaults
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])
    params = model_params(model)
    g_all = per_example_grads(task, model, params, ArrayDataset(x, y))
    g_one = per_example_grads(task, model, params, ArrayDataset(x[2:3], y[2:3]))
    assert g_all.shape == (4, num_params(params))
    assert torch.isfinite(g_all).all()
    assert torch.allclose(g_all[2], g_one[0], atol=1e-5)
    assert isinstance(pickle.loads(pickle.dumps(task)).make_model(), ResNet9)
