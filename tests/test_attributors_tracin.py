"""TracIn against an explicit loop of autograd gradient products."""

from __future__ import annotations

import pytest
import torch

from attr_problems import loop_grads, problem, rel_err
from tdatune.attributors import make_attributor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def explicit_tracin(prob, epochs: list[int], normalize: bool) -> torch.Tensor:
    """- sum_t eta_t grad f(z'_j; theta_t) . grad l(z_i; theta_t), one pair at a time."""
    m, n = len(prob.explained), len(prob.train)
    out = torch.zeros(m, n, dtype=torch.float64)
    for t in epochs:
        eta = prob.context.learning_rates[t] if prob.context.learning_rates else 1.0
        v = loop_grads(prob, prob.explained, "output", t)
        g = loop_grads(prob, prob.train, "loss", t)
        for j in range(m):
            for i in range(n):
                a, b = v[j], g[i]
                if normalize:
                    a, b = a / a.norm(), b / b.norm()
                out[j, i] -= eta * torch.dot(a, b)
    return out


def test_tracin_equals_explicit_loop_with_learning_rates():
    prob = problem("mlp", learning_rates=True)
    attr = make_attributor("tracin").fit(prob.context)
    assert sorted(attr.train_grads) == list(range(6))  # all 6 epochs (fewer than 10 saved)
    for normalize in (False, True):
        ref = explicit_tracin(prob, list(range(6)), normalize)
        assert rel_err(attr.score(prob.explained, normalize=normalize), ref) < 1e-4


def test_tracin_selected_checkpoints_and_adding_one():
    prob = problem("mlp")
    attr = make_attributor("tracin", checkpoints=[5]).fit(prob.context)
    assert rel_err(attr.score(prob.explained), explicit_tracin(prob, [5], False)) < 1e-4
    attr.add_checkpoint(3)
    assert rel_err(attr.score(prob.explained), explicit_tracin(prob, [3, 5], False)) < 1e-4


def test_tracin_sign_follows_a_gradient_step():
    """A small SGD step on z_i changes f(z') by about eta * score (positive = raises f)."""
    prob = problem("lr")
    attr = make_attributor("tracin", checkpoints=[-1]).fit(prob.context)
    scores = attr.score(prob.explained).double()
    g = loop_grads(prob, prob.train, "loss")
    from torch.func import functional_call

    from attr_problems import model64

    m, params = model64(prob)
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def outputs(theta: torch.Tensor) -> torch.Tensor:
        p, s = {}, 0
        for k, v in params.items():
            p[k] = theta[s : s + v.numel()].reshape(v.shape)
            s += v.numel()
        out = functional_call(m, p, (prob.explained.inputs.double(),))
        return prob.task.output_fn(out, prob.explained.targets)

    eta = 1e-4
    for i in (0, 7):
        change = (outputs(flat - eta * g[i]) - outputs(flat)) / eta
        assert torch.allclose(change, scores[:, i], rtol=1e-2, atol=1e-4)
