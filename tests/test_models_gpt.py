"""The small GPT: shapes, causal masking, tied head, per-example gradients, pickling."""

from __future__ import annotations

import pickle
from functools import partial

import pytest
import torch

from tdatune.data.base import ArrayDataset
from tdatune.features.gradients import num_params, per_example_grads
from tdatune.models.gpt import GPT
from tdatune.models.outputs import cross_entropy
from tdatune.models.task import Task, model_params


def small(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(**{"vocab_size": 37, "block_len": 12, "d_model": 16, "n_layer": 2, "n_head": 4,
                  **kw})


def test_output_shape_and_shorter_sequences():
    model = small()
    assert model(torch.randint(0, 37, (3, 12))).shape == (3, 12, 37)
    assert model(torch.randint(0, 37, (2, 5))).shape == (2, 5, 37)
    with pytest.raises(ValueError, match="block_len"):
        model(torch.randint(0, 37, (1, 13)))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.randint(0, 37, (12,)))


def test_causal_masking():
    model = small().eval()
    x = torch.randint(0, 37, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 5) % 37
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_tied_head_shares_the_embedding():
    tied, untied = small(tie_head=True), small()
    assert tied.head.weight is tied.tok_emb.weight
    assert num_params(model_params(untied)) - num_params(model_params(tied)) == 37 * 16


def test_every_projection_is_a_linear_layer():
    names = {n for n, m in small().named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.1.mlp.proj",
            "head"} <= names
    assert not list(small().buffers())


def test_per_example_block_loss_gradients_match_autograd():
    model = small()
    task = Task(make_model=partial(GPT, 37, 12, 16, 2, 4), output="negative_loss")
    x = torch.randint(0, 37, (3, 12))
    y = torch.randint(0, 37, (3, 12))
    params = model_params(model)
    grads = per_example_grads(task, model, params, ArrayDataset(x, y))
    assert grads.shape == (3, num_params(params))
    model.zero_grad()
    cross_entropy(model(x[1:2]), y[1:2]).sum().backward()
    direct = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grads[1], direct, atol=1e-5)
    assert pickle.loads(pickle.dumps(task)).make_model().head.weight.shape == (37, 16)
