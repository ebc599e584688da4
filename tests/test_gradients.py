"""Per-example gradients and output functions against independent autograd computations."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from tdatune.data.base import ArrayDataset
from tdatune.features.gradients import per_example_grads
from tdatune.models.outputs import get_output_fn, margin
from tdatune.models.small import MLP, LogisticRegression
from tdatune.models.task import Task
from tdatune.models.training import init_model


def _loop_grads(model, data, fn):
    rows = []
    params = list(model.parameters())
    for i in range(len(data)):
        out = fn(model(data.inputs[i : i + 1]), data.targets[i : i + 1])[0]
        grads = torch.autograd.grad(out, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("factory", [partial(LogisticRegression, 64, 10), partial(MLP, 64, (16, 8), 10)])
@pytest.mark.parametrize("target,output", [("loss", "margin"), ("output", "margin"),
                                           ("output", "probability"), ("output", "loss")])
def test_per_example_grads_match_autograd_loop(digits_small, factory, target, output):
    task = Task(make_model=factory, output=output)
    model = init_model(task, seed=3)
    params = dict(model.named_parameters())
    data = digits_small.train.subset(torch.arange(25))
    fast = per_example_grads(task, model, params, data, target=target, chunk_size=7)
    fn = task.loss_fn if target == "loss" else task.output_fn
    slow = _loop_grads(model, data, fn)
    assert fast.shape == slow.shape
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


def test_margin_is_log_odds_of_correct_class():
    logits = torch.randn(50, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (50,))
    p = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(margin(logits, y), torch.log(p / (1 - p)))


def test_nan_gradient_names_the_example(digits_small):
    task = Task(make_model=partial(LogisticRegression, 64, 10))
    model = init_model(task, seed=0)
    x = digits_small.train.inputs[:10].clone()
    x[6, 3] = float("nan")
    data = ArrayDataset(x, digits_small.train.targets[:10])
    with pytest.raises(ValueError, match="example 6"):
        per_example_grads(task, model, dict(model.named_parameters()), data, chunk_size=4)


def test_unknown_output_function_lists_choices():
    with pytest.raises(ValueError, match="margin"):
        get_output_fn("logit")
