"""Training-objective curvature against torch.autograd.functional.hessian."""

from __future__ import annotations

import pytest
import torch

from attr_problems import dense_hessian, model64, problem
from tdatune.curvature.hessian import (
    TrainingObjective,
    flatten_params,
    power_iteration,
    unflatten_params,
)
from tdatune.data.base import ArrayDataset
from tdatune.models.task import Task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def objective(kind: str, data: ArrayDataset | None = None) -> TrainingObjective:
    prob = problem(kind)
    m, params = model64(prob)
    data = data or prob.train
    data = ArrayDataset(data.inputs.double(), data.targets)
    return TrainingObjective(prob.task, m, params, data, prob.weight_decay, chunk_size=20)


def test_exact_hessian_matches_autograd_functional():
    for kind in ("lr", "mlp"):
        ref = dense_hessian(problem(kind))
        got = objective(kind).exact()
        assert torch.allclose(got, ref, atol=1e-10, rtol=1e-8), kind


def test_hvp_batched_and_on_index():
    obj = objective("mlp")
    h = obj.exact()
    vecs = torch.randn(5, obj.p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(obj.hvp(vecs), vecs @ h, atol=1e-10)
    assert torch.allclose(obj.hvp(vecs[0]), h @ vecs[0], atol=1e-10)
    idx = torch.tensor([3, 10, 11, 40])
    prob = problem("mlp")
    sub = objective("mlp", prob.train.subset(idx))
    assert torch.allclose(obj.hvp(vecs, idx), sub.hvp(vecs), atol=1e-10)


def test_power_iteration_estimates_top_eigenvalue():
    obj = objective("lr")
    top = float(torch.linalg.eigvalsh(obj.exact()).abs().max())
    est = obj.top_eigenvalue(iters=200)
    assert est <= top * (1 + 1e-8) and est > 0.9 * top
    diag = torch.tensor([5.0, 1.0, -7.0], dtype=torch.float64)
    assert abs(power_iteration(lambda v: diag * v, 3, iters=200) - 7.0) < 1e-6


def test_flatten_roundtrip_and_gradient_near_zero_at_optimum():
    obj = objective("lr")
    back = unflatten_params(obj.theta, obj.params)
    assert torch.equal(flatten_params(back), obj.theta)
    assert float(obj.gradient().norm()) < 1e-3


def test_hvp_under_a_tight_memory_budget_splits_and_stays_exact():
    prob = problem("mlp")
    m, params = model64(prob)
    data = ArrayDataset(prob.train.inputs.double(), prob.train.targets)
    roomy = TrainingObjective(prob.task, m, params, data, prob.weight_decay, chunk_size=20)
    per_pair = roomy.pair_bytes()
    # room for 3 (vector, example) pairs: 3 examples per chunk, one vector per vmap step
    tight = TrainingObjective(prob.task, m, params, data, prob.weight_decay, chunk_size=20,
                              memory_bytes=3 * per_pair)
    assert tight.hvp_split(5, len(data)) == (1, 3)
    assert roomy.hvp_split(5, len(data)) == (5, 20)
    vecs = torch.randn(5, roomy.p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = roomy.exact()
    assert torch.allclose(tight.hvp(vecs), vecs @ h, atol=1e-10)
    idx = torch.tensor([1, 4, 9, 30, 31])
    assert torch.allclose(tight.hvp(vecs, idx), roomy.hvp(vecs, idx), atol=1e-10)


def test_pair_bytes_counts_activations_not_parameters():
    # a 3-H-4 tanh MLP on one float64 example: autograd saves a few H-sized activations (the
    # hidden pre-activation and tanh output, and their create-graph gradients) and a constant
    # for input and logits; the 8H parameters are not counted. So the bytes are exactly
    # linear in H with a slope of a few doubles and an intercept independent of H.
    def pair_doubles(hidden: int) -> float:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(),
                                    torch.nn.Linear(hidden, 4)).double()
        params = {k: v.detach() for k, v in model.named_parameters()}
        data = ArrayDataset(torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 4, (10,)))
        return TrainingObjective(Task(make_model=lambda: model), model, params,
                                 data).pair_bytes() / 8

    small, mid, big = (pair_doubles(h) for h in (10, 100, 1000))
    slope = (big - mid) / 900
    assert slope == (mid - small) / 90
    assert 2 <= slope <= 8
    assert 0 <= small - 10 * slope < 100
