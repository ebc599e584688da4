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


def _loop_grads(model, data, fn, params=None):
    """One example at a time, plain autograd (w.r.t. ``params``, default all parameters)."""
    rows = []
    params = list(model.parameters()) if params is None else params
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
    params = {k: v.detach().abs() + 0.1 for k, v in model.named_parameters()}
    x = digits_small.train.inputs[:10].clone()
    x[6] = 3e38  # finite (NaN inputs are refused by ArrayDataset), but its logits overflow
    data = ArrayDataset(x, digits_small.train.targets[:10])
    with pytest.raises(ValueError, match="example 6"):
        per_example_grads(task, model, params, data, chunk_size=4)


def test_nan_inputs_are_refused_naming_the_example(digits_small):
    x = digits_small.train.inputs[:10].clone()
    x[6, 3] = float("nan")
    with pytest.raises(ValueError, match="example 6"):
        ArrayDataset(x, digits_small.train.targets[:10])


LINEAR_MODELS = [partial(LogisticRegression, 64, 10), partial(MLP, 64, (16, 8), 10)]


@pytest.mark.parametrize("factory", LINEAR_MODELS)
@pytest.mark.parametrize("target", ["loss", "output"])
def test_hooked_path_alone_matches_autograd_loop(digits_small, factory, target):
    """The hooked path on its own, with no fallback behind it."""
    from tdatune.features.capture import Hooks, capture, plan_capture, write_flat
    from tdatune.features.gradients import num_params

    task = Task(make_model=factory, output="margin")
    model = init_model(task, seed=5)
    model.eval()
    params = dict(model.named_parameters())
    data = digits_small.train.subset(torch.arange(13))
    fn = task.loss_fn if target == "loss" else task.output_fn
    plan = plan_capture(model, list(params), {k: v.shape for k, v in params.items()})
    assert plan.leftover == [] and len(plan.layers) == len(params) // 2
    with Hooks(plan) as hooks:
        got = capture(plan, hooks, lambda: fn(model(data.inputs), data.targets), len(data))
    dest = torch.full((len(data), num_params(params)), float("nan"))
    write_flat(plan, got, dest)
    torch.testing.assert_close(dest, _loop_grads(model, data, fn), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("factory", LINEAR_MODELS)
def test_linear_models_take_the_hooked_path(digits_small, factory, monkeypatch):
    """LR and MLPs must not silently fall back to vmap: every chunk goes through the hooks
    (the probe too), and none is refused."""
    import tdatune.features.gradients as gradients

    real = gradients.GradientSource._captured
    calls: list[int] = []

    def spy(self, x, y, b):
        calls.append(b)
        return real(self, x, y, b)

    def no_vmap(*args, **kwargs):
        raise AssertionError("vmap used")

    monkeypatch.setattr(gradients.GradientSource, "_captured", spy)
    monkeypatch.setattr(gradients.GradientSource, "_vmap", no_vmap)
    task = Task(make_model=factory)
    model = init_model(task, seed=3)
    data = digits_small.train.subset(torch.arange(25))
    per_example_grads(task, model, dict(model.named_parameters()), data, chunk_size=7)
    assert calls == [4, 7, 7, 7, 4]  # the probe, then chunks of 7, 7, 7, 4


def test_unknown_output_function_lists_choices():
    with pytest.raises(ValueError, match="margin"):
        get_output_fn("logit")


class _BatchCentred(torch.nn.Module):
    """Subtracts the batch mean: couples the examples of a batch (a batch of one gives 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class _Tied(torch.nn.Module):
    """One linear layer applied twice in a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def _conv() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Unflatten(1, (1, 8, 8)), torch.nn.Conv2d(1, 2, 3),
                               torch.nn.Flatten(), torch.nn.Linear(72, 10))


def _centred() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 8), _BatchCentred(), torch.nn.Linear(8, 10))


@pytest.mark.parametrize("factory", [_Tied, _conv, _centred])
def test_models_outside_the_linear_fast_path_match_the_single_example_loop(digits_small, factory):
    """Tied layers, convolutions and batch-coupled modules take the generic path, whose
    gradients are each example's own (a forward pass of that example alone)."""
    task = Task(make_model=factory)
    model = init_model(task, seed=1)
    params = dict(model.named_parameters())
    data = digits_small.train.subset(torch.arange(12))
    fast = per_example_grads(task, model, params, data, chunk_size=5)
    torch.testing.assert_close(fast, _loop_grads(model, data, task.loss_fn), rtol=1e-4, atol=1e-6)


def test_gradients_of_some_linear_layers_only(digits_small):
    """Differentiating a subset of the parameters (the head, its weight before the first
    layer's bias) keeps the order of the given names."""
    task = Task(make_model=partial(MLP, 64, (16,), 10), output="margin")
    model = init_model(task, seed=2)
    named = dict(model.named_parameters())
    names = [k for k in named if k.endswith("weight")][-1:] + [k for k in named if k.endswith("bias")][:1]
    params = {k: named[k] for k in names}
    data = digits_small.train.subset(torch.arange(9))
    fast = per_example_grads(task, model, params, data, target="output", chunk_size=4)
    slow = _loop_grads(model, data, task.output_fn, list(params.values()))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


def test_out_buffer_cannot_take_projected_chunks(digits_small):
    from tdatune.features.gradients import iter_per_example_grads
    from tdatune.features.projection import Projector

    task = Task(make_model=partial(LogisticRegression, 64, 10))
    model = init_model(task, seed=0)
    params = dict(model.named_parameters())
    out = torch.empty(len(digits_small.train), 650)
    with pytest.raises(ValueError, match="projector"):
        next(iter_per_example_grads(task, model, params, digits_small.train, out=out,
                                    projector=Projector(650, 8, seed=0)))
