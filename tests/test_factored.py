"""Inner products and Kronecker projections from the hooks' factors, against the same
quantities computed here from gradients formed by single-example backward passes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tdatune.features.factored as factored
from tdatune.data.base import ArrayDataset
from tdatune.features.capture import Captured
from tdatune.features.factored import KroneckerProjector, inner_products
from tdatune.features.gradients import GradientSource, per_example_grads
from tdatune.models.task import Task
from test_capture import ConvNet, Reused, SeqNet, loop_grads, plain_call


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(),
                         nn.Linear(7, 3))


def problem(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(11)
    if name == "mlp":
        return mlp(), torch.randn(10, 12), torch.randint(0, 3, (10,))
    if name == "seq":
        ids = torch.randint(0, 11, (8, 7))
        ids[::3, 5:] = 0
        return SeqNet(), ids, torch.randint(0, 3, (8,))
    if name == "conv":
        return ConvNet(), torch.randn(6, 2, 8, 8), torch.randint(0, 3, (6,))
    return Reused(), torch.randint(0, 10, (6, 4)), torch.randint(0, 10, (6,))


def captured_and_reference(name: str) -> tuple[GradientSource, Captured, torch.Tensor, list]:
    model, x, y = problem(name)
    model.eval()
    task = Task(make_model=lambda: model, loss_fn=ce)
    data = ArrayDataset(x, y)
    source = GradientSource(task, model, dict(model.named_parameters()), probe=data)
    assert source.mode == "hooks"
    got = source.captured(x, y, len(data))
    reference = loop_grads(model, plain_call, ce, x, y, len(data))
    layers = [c for c in source.plan.layers if c.factored]
    return source, got, reference, layers


@pytest.mark.parametrize("name", ["mlp", "seq", "conv", "tied"])
@pytest.mark.parametrize("rule", ["factors", "rows", "flop rule"])
def test_inner_products_equal_the_formed_gram(name, rule, monkeypatch):
    """Both sides of the FLOP rule (forced, and as the rule picks) give G G^T."""
    if rule != "flop rule":
        monkeypatch.setattr(factored, "factored_is_cheaper", lambda *a: rule == "factors")
    _, got, reference, layers = captured_and_reference(name)
    gram = inner_products(layers, got, got)
    want = reference @ reference.T
    torch.testing.assert_close(gram, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_the_flop_rule():
    """Hand-counted: an MLP layer takes the factors, a wide-token transformer layer the rows."""
    assert factored.factored_is_cheaper(1, 1, 785, 128)  # 913 < 100,480
    assert not factored.factored_is_cheaper(64, 64, 129, 128)  # 1,052,672 > 16,512
    assert factored.factored_is_cheaper(2, 3, 10, 10) is (6 * 20 < 100)


def test_kronecker_projection_is_p_out_m_p_in_per_layer():
    """Per layer P_out^T M P_in with M formed from the loop's gradients, layers in order."""
    model, x, y = problem("mlp")
    model.eval()
    task = Task(make_model=lambda: model, loss_fn=ce)
    params = dict(model.named_parameters())
    proj = KroneckerProjector(model, params, 40, seed=3)
    got = per_example_grads(task, model, params, ArrayDataset(x, y), projector=proj,
                            chunk_size=4)
    reference = loop_grads(model, plain_call, ce, x, y, len(x))
    cols, start, parts = [], 0, []
    for p in params.values():
        cols.append(reference[:, start : start + p.numel()])
        start += p.numel()
    for i, side in enumerate(proj.sides):
        w, b = cols[2 * i], cols[2 * i + 1]
        lin = model[2 * i]
        m = torch.cat([w.reshape(-1, lin.out_features, lin.in_features),
                       b[:, :, None]], dim=2)
        p_in = side.p_in if side.p_in is not None else torch.eye(lin.in_features + 1)
        p_out = side.p_out if side.p_out is not None else torch.eye(lin.out_features)
        parts.append(torch.einsum("ok,boi,ij->bkj", p_out, m, p_in).reshape(len(x), -1))
    want = torch.cat(parts, dim=1)
    assert got.shape == (len(x), proj.d) and proj.d <= 40
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_full_width_kronecker_projection_keeps_the_gram():
    """With d = p every side is kept whole: the features are a permutation of the gradients."""
    model, x, y = problem("mlp")
    model.eval()
    task = Task(make_model=lambda: model, loss_fn=ce)
    params = dict(model.named_parameters())
    p = sum(v.numel() for v in params.values())
    proj = KroneckerProjector(model, params, p)
    assert proj.d == p and all(s.p_in is None and s.p_out is None for s in proj.sides)
    got = per_example_grads(task, model, params, ArrayDataset(x, y), projector=proj)
    reference = loop_grads(model, plain_call, ce, x, y, len(x))
    torch.testing.assert_close(got @ got.T, reference @ reference.T, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["seq", "conv", "tied"])
def test_projection_from_factors_equals_projection_from_formed_rows(name):
    """A batch whose gradients were materialised (no hooks) projects to the same features."""
    source, got, reference, _ = captured_and_reference(name)
    model = source.model
    params = dict(model.named_parameters())
    p = sum(v.numel() for v in params.values())
    proj = KroneckerProjector(model, params, max(8, p // 5), seed=1)
    cols, start = {}, 0
    for k, v in params.items():
        cols[k] = reference[:, start : start + v.numel()]
        start += v.numel()
    dense_only = Captured(got.b, [], cols)
    want = proj.project_captured(dense_only)
    torch.testing.assert_close(proj.project_captured(got), want, rtol=1e-4,
                               atol=1e-5 * float(want.abs().max()))


def test_budget_split_follows_the_sides():
    k_in, k_out = factored.split_sides(470, 785, 128)
    assert k_in * k_out <= 470 and k_out == round(math.sqrt(470 * 128 / 785))
    assert factored.split_sides(10**9, 5, 3) == (5, 3)


def test_iffim_and_tracin_from_factors_equal_dense_formulas():
    """Unprojected with n < p, IFFIM's kernel form and TracIn's products come from the
    factors; scores equal -v (F + lam I)^-1 g and -sum_t eta_t v_t . g_t computed here from
    loop gradients with a dense solve."""
    from attr_problems import loop_grads as prob_loop_grads
    from attr_problems import problem as attr_problem
    from tdatune.attributors import make_attributor

    prob = attr_problem("mlp", n_train=40)
    g = prob_loop_grads(prob, prob.train, "loss")
    v = prob_loop_grads(prob, prob.explained, "output")
    n, p = g.shape
    assert n < p
    iffim = make_attributor("iffim").fit(prob.context)
    assert iffim.factored is not None
    lam = 1e-2
    fisher = g.T @ g / n + lam * torch.eye(p, dtype=g.dtype)
    want = -(v @ torch.linalg.solve(fisher, g.T))
    got = iffim.score(prob.explained, lam=lam).double()
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))

    tracin = make_attributor("tracin", checkpoints=[-1]).fit(prob.context)
    assert type(tracin.train_grads[len(prob.context.checkpoints) - 1]).__name__ == \
        "FactoredGradients"
    want = -(v @ g.T)
    torch.testing.assert_close(tracin.score(prob.explained).double(), want, rtol=1e-4,
                               atol=1e-5 * float(want.abs().max()))
    cos = want / (v.norm(dim=1)[:, None] * g.norm(dim=1)[None, :])
    torch.testing.assert_close(tracin.score(prob.explained, normalize=True).double(), cos,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "seq", "conv", "tied"])
def test_factored_gradients_gram_products_and_norms(name):
    """FactoredGradients keeps factors or forms rows layer by layer (the sequence model's
    layers form rows); G G^T, V G^T and the row norms equal the loop gradients'."""
    from tdatune.features.kernel import FactoredGradients

    model, x, y = problem(name)
    model.eval()
    task = Task(make_model=lambda: model, loss_fn=ce)
    params = dict(model.named_parameters())
    train, other = ArrayDataset(x, y), ArrayDataset(x[:3], y[:3])
    fg = FactoredGradients(task, model, params, train, chunk_size=4)
    vg = FactoredGradients(task, model, params, other, chunk_size=2)
    g = loop_grads(model, plain_call, ce, x, y, len(x)).double()
    scale = float((g @ g.T).abs().max())
    torch.testing.assert_close(fg.gram(), g @ g.T, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(fg.products(vg), g[:3] @ g.T, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(fg.row_norms(), g.norm(dim=1), rtol=1e-4, atol=1e-6)
    formed_rows = sum(len(c.factors) == 0 for _, c in fg.chunks)
    if name == "seq":
        assert formed_rows == len(fg.chunks)  # T = 7 positions: every layer forms its rows
    if name == "mlp":
        assert fg.stored < len(x) * sum(p.numel() for p in params.values())
