"""K-FAC / EK-FAC scores of a wide explained set: weighted straight from the gradients in
groups (one training pass each, no eigen-coordinates held) and, with ``query_rank``, kept as
rank-r factors; checked against dense Kronecker solves, numpy SVDs and loop gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tdatune.attributors.kfac as kfac_module
import tdatune.features.low_rank as low_rank_module
from tdatune.attributors import AttributionContext, make_attributor
from tdatune.data.base import ArrayDataset
from tdatune.features.capture import Conv1DRule, EmbeddingRule
from tdatune.features.gradients import GradientSource
from tdatune.features.low_rank import (
    LowRank,
    factors_are_cheaper,
    low_rank,
    low_rank_products,
)
from tdatune.models.task import Task
from test_capture import ConvNet, SeqNet, loop_grads, plain_call
from test_kfac import ce, dense_scores, margin_out, mlp


def fitted(strategy: str, n: int = 30, m: int = 5, seed: int = 3):
    model = mlp().eval()
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    xe, ye = torch.randn(m, 6, generator=gen), torch.randint(0, 3, (m,), generator=gen)
    task = Task(make_model=mlp, loss_fn=ce, output=margin_out)
    ctx = AttributionContext(task, ArrayDataset(x, y), [model.state_dict()], chunk_size=7)
    return model, (x, y), (xe, ye), make_attributor(strategy).fit(ctx)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
@pytest.mark.parametrize("budget", [None, 1, 2 * 4 * 74])
def test_grouped_scores_equal_the_dense_kronecker_solve(monkeypatch, strategy, budget):
    """A wide explained set (forced: the keep limit at 0) is scored without a path, in groups
    of 1 (a budget of 1 byte), 2 (two examples' 74 numbers in float32) or all at once, at one
    damping and at one damping per layer: equal to the dense solve. Blocks are weighted one or
    two examples at a time (a small row budget)."""
    monkeypatch.setattr(kfac_module, "COORDS_KEEP_LIMIT", 0)
    monkeypatch.setattr("tdatune.curvature.kfac.QUERY_ROWS_BUDGET", 40)
    model, train, explained, att = fitted(strategy)
    data = ArrayDataset(*explained)
    if budget is not None:
        assert [len(g) for g in att.query_groups(5, budget=budget)] == (
            [1] * 5 if budget == 1 else [2, 2, 1])
    for lam in (1e-2, [3e-3, 1e-1, 2e-2]):
        want = dense_scores(model, train, explained, lam, strategy)
        got = att.score(data, lam=lam, query_memory=budget).double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert att._paths == {}  # no path, no eigen-coordinates held


def test_groups_are_said_before_the_work(monkeypatch, capsys):
    monkeypatch.setattr(kfac_module, "COORDS_KEEP_LIMIT", 0)
    _, _, explained, att = fitted("ekfac")
    att.score(ArrayDataset(*explained), lam=1e-2, query_memory=2 * 4 * 74)
    err = capsys.readouterr().err
    assert "5 explained examples in 3 groups of up to 2" in err


def dense_weighted(model, train, explained, lam: float, strategy: str) -> list[np.ndarray]:
    """Per layer, each explained example's (F_l + lam)^-1 v_l as [m, out, in+1], by a dense
    solve (the layers' Fisher as in test_kfac.dense_scores)."""
    from test_kfac import layer_pairs

    (x, y), (xe, ye) = train, explained
    out = []
    for (a, d), (ae, de) in zip(layer_pairs(model, x, y, ce), layer_pairs(model, xe, ye,
                                                                           margin_out),
                                strict=True):
        n = a.shape[0]
        la, qa = torch.linalg.eigh(a.T @ a / n)
        ls, qs = torch.linalg.eigh(d.T @ d / n)
        g = torch.einsum("no,ni->noi", d, a)
        rot = torch.einsum("oj,noi,ik->njk", qs, g, qa)
        lam_k = (rot**2).mean(0) if strategy == "ekfac" else torch.outer(ls, la)
        q = torch.kron(qs, qa)
        fisher = q @ torch.diag(lam_k.reshape(-1)) @ q.T
        v = torch.einsum("mo,mi->moi", de, ae)
        w = torch.linalg.solve(fisher + lam * torch.eye(fisher.shape[0], dtype=a.dtype),
                               v.reshape(v.shape[0], -1).T).T
        out.append((w.reshape(v.shape).numpy(), g.numpy()))
    return out


@pytest.mark.parametrize("rank", [1, 2])
def test_query_rank_scores_are_the_truncated_svd_of_the_weighted_gradient(rank):
    """query_rank=r: each layer's weighted gradient (a dense solve) replaced by its best
    rank-r approximation (numpy's SVD); scores are -<W_r, G_i> summed over layers. Layers of
    sides 5 x 7, 4 x 6, 3 x 5 (bias column): rank 1 and 2 compress all three."""
    model, train, explained, att = fitted("ekfac")
    lam = 1e-2
    want = 0
    for w, g in dense_weighted(model, train, explained, lam, "ekfac"):
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        w_r = (u[:, :, :rank] * s[:, None, :rank]) @ vt[:, :rank, :]
        want = want - np.einsum("moi,noi->mn", w_r, g)
    got = att.score(ArrayDataset(*explained), lam=lam, query_rank=rank).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
    exact = att.score(ArrayDataset(*explained), lam=lam).double().numpy()
    assert np.abs(got - exact).max() > 1e-3 * np.abs(exact).max()  # rank 1-2 is not exact


def test_a_rank_at_the_smaller_side_is_exact():
    """r >= min(out, in) of every layer: nothing is compressed, scores are exact."""
    model, train, explained, att = fitted("kfac")
    want = dense_scores(model, train, explained, 1e-2, "kfac")
    got = att.score(ArrayDataset(*explained), lam=1e-2, query_rank=5).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_randomised_low_rank_matches_the_optimal_truncation():
    """On [3, 60, 40] matrices with a decaying spectrum (not low-rank), the randomised SVD's
    rank-6 error is within 1% of Eckart-Young's optimum (numpy's SVD)."""
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(3, 60, 40, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(3, 40, 40, generator=gen, dtype=torch.float64)).Q
    s = 0.7 ** torch.arange(40, dtype=torch.float64)
    w = (u * s) @ v.transpose(1, 2)
    lr = low_rank(w, 6)
    assert lr.left.shape == (3, 60, 6) and lr.right.shape == (3, 6, 40)
    err = torch.linalg.matrix_norm(w - lr.dense()).numpy()
    sv = np.linalg.svd(w.numpy(), compute_uv=False)
    optimal = np.sqrt((sv[:, 6:] ** 2).sum(1))
    assert np.all(err <= 1.01 * optimal) and np.all(err >= optimal * (1 - 1e-9))


def layer_matrix(c, reference: torch.Tensor, offsets: dict[str, slice], b: int) -> torch.Tensor:
    """A layer's per-example M [b, out, in(+1)] cut from the loop gradients."""
    w = reference[:, offsets[c.params["weight"]]]
    shape = c.module.weight.shape
    if isinstance(c.rule, (EmbeddingRule, Conv1DRule)):
        m = w.reshape(b, shape[0], shape[1]).transpose(1, 2)
    else:
        m = w.reshape(b, shape[0], -1)
    if "bias" in c.params:
        m = torch.cat([m, reference[:, offsets[c.params["bias"]]].reshape(b, -1, 1)], 2)
    return m


@pytest.mark.parametrize("route", ["factors", "formed"])
@pytest.mark.parametrize("name", ["seq", "conv"])
def test_low_rank_products_equal_loop_gradients(monkeypatch, name, route):
    """<left right, M_i> from the hooks' factors (embeddings: one-hot inputs; convolutions:
    many positions; linear layers on tokens, with and without bias) or from the formed M
    (both sides of the FLOP rule, forced) equals the loop gradients' M_i, for random rank-2
    factors of 4 explained examples (rebuilt one at a time: a tiny product budget)."""
    monkeypatch.setattr(low_rank_module, "factors_are_cheaper", lambda *a: route == "factors")
    monkeypatch.setattr(low_rank_module, "PRODUCT_BUDGET", 1)
    torch.manual_seed(5)
    if name == "seq":
        model, x = SeqNet(), torch.randint(0, 11, (6, 7))
    else:
        model, x = ConvNet(), torch.randn(6, 2, 8, 8)
    model.eval()
    y = torch.randint(0, 3, (6,))
    task = Task(make_model=lambda: model, loss_fn=ce)
    data = ArrayDataset(x, y)
    params = dict(model.named_parameters())
    source = GradientSource(task, model, params, probe=data)
    captured = source.captured(x, y, 6)
    reference = loop_grads(model, plain_call, ce, x, y, 6)
    offsets, start = {}, 0
    for k, v in params.items():
        offsets[k] = slice(start, start + v.numel())
        start += v.numel()
    gen = torch.Generator().manual_seed(9)
    layers = [c for c in source.plan.layers if c.factored]
    assert layers
    for c in layers:
        m = layer_matrix(c, reference, offsets, 6)
        lr = LowRank(torch.randn(4, m.shape[1], 2, generator=gen),
                     torch.randn(4, 2, m.shape[2], generator=gen))
        want = torch.einsum("goi,boi->gb", lr.dense(), m)
        got = low_rank_products(c, captured, lr)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_the_low_rank_flop_rule():
    """Hand-counted per batch of b training examples (factors: g b T r (out + in); formed:
    b T out in + g r out in + g b out in):"""
    # an MLP layer, one position, one explained example: 0.9M against 9.6M
    assert factors_are_cheaper(1, 32, 1, 32, 128, 785)
    # 100 explained on a 64-token [1152 x 384] layer: 10.07G against 0.91G + 1.42G + 1.42G
    assert not factors_are_cheaper(100, 32, 64, 32, 1152, 384)
    # 4 explained at rank 8 on 4 tokens of [256 x 256]: 2.1M against 8.4M + 2.1M + 8.4M
    assert factors_are_cheaper(4, 32, 4, 8, 256, 256)
    # 20 explained at rank 32 on 64 tokens of [384 x 128]: 671M against 101M + 31M + 31M; W
    # rebuilt once per batch (counted per example it would be 1.0G and the factors would win)
    assert not factors_are_cheaper(20, 32, 64, 32, 384, 128)
