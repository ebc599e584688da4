"""IFFIM's route for a large unprojected kernel: its top k eigenpairs by randomised subspace
iteration, the rest counted as zero curvature; checked against numpy's eigh and a dense
formula on loop gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tdatune.attributors.iffim as iffim_module
from tdatune.attributors import AttributionContext, make_attributor
from tdatune.curvature.eigen import top_psd_eigenpairs
from tdatune.data.base import ArrayDataset
from tdatune.models.task import Task
from tdatune.study.attribute import attribute_estimate
from test_capture import loop_grads, plain_call
from test_kfac import ce, margin_out, mlp


def test_top_psd_eigenpairs_match_numpy():
    """A 300 x 300 PSD matrix with eigenvalues 0.9^j (slow decay, not low-rank): with 22
    columns and 4 subspace iterations the j-th Ritz value converges as (0.9^(22 - j))^10;
    the 12th as 0.35^10 ~ 3e-5. So the top 12 eigenvalues to 1e-4 relative (the top 4, 0.15^10, to
    1e-8), the eigenvectors up to sign."""
    gen = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64)).Q
    values = 0.9 ** torch.arange(300, dtype=torch.float64)
    kernel = (q * values) @ q.T
    sigma, w = top_psd_eigenpairs(kernel, 12)
    want_values, want_vectors = np.linalg.eigh(kernel.numpy())
    np.testing.assert_allclose(sigma.numpy(), want_values[::-1][:12], rtol=1e-4)
    np.testing.assert_allclose(sigma.numpy()[:4], want_values[::-1][:4], rtol=1e-8)
    overlap = np.abs(np.sum(w.numpy() * want_vectors[:, ::-1][:, :12], axis=0))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-2)


def problem(n: int = 40, m: int = 4):
    model = mlp().eval()  # 74 parameters: n = 40 < p, the kernel form
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    xe, ye = torch.randn(m, 6, generator=gen), torch.randint(0, 3, (m,), generator=gen)
    task = Task(make_model=mlp, loss_fn=ce, output=margin_out)
    ctx = AttributionContext(task, ArrayDataset(x, y), [model.state_dict()], chunk_size=9)
    g = loop_grads(model, plain_call, ce, x, y, n).double().numpy()
    v = loop_grads(model, plain_call, margin_out, xe, ye, m).double().numpy()
    return ctx, ArrayDataset(xe, ye), g, v


def dense_truncated(g: np.ndarray, v: np.ndarray, lam: float, k: int | None) -> np.ndarray:
    """-(v U_k (S_k + lam)^-1 U_k^T g^T + v (I - U_k U_k^T) g^T / lam) with F = g^T g / n by
    numpy's eigh (k None: the whole non-null spectrum, i.e. the exact damped solve)."""
    n, p = g.shape
    s, u = np.linalg.eigh(g.T @ g / n)
    s, u = s[::-1], u[:, ::-1]
    if k is None:
        return -(v @ np.linalg.solve(g.T @ g / n + lam * np.eye(p), g.T))
    uk, sk = u[:, :k], s[:k]
    top = (v @ uk) / (sk + lam) @ (g @ uk).T
    rest = v @ (np.eye(p) - uk @ uk.T) @ g.T / lam
    return -(top + rest)


@pytest.mark.parametrize("lam", [1e-3, 1e-1])
def test_eig_rank_scores_equal_the_dense_truncated_formula(lam):
    """eig_rank=5 of a 40 x 40 kernel: scores, subset sums and self-influence equal the
    dense formula; the rest term matters (without it the scores differ)."""
    ctx, explained, g, v = problem()
    att = make_attributor("iffim", eig_rank=5).fit(ctx)
    want = dense_truncated(g, v, lam, 5)
    got = att.score(explained, lam=lam).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    path = att.lambda_path(explained)
    top_only = -(path.explained_coords / (path.sigma + lam)) @ path.train_coords.T
    assert np.abs(top_only.numpy() - want).max() > 1e-2 * np.abs(want).max()
    masks = torch.rand(6, 40, generator=torch.Generator().manual_seed(2)) < 0.5
    preds = path.subset_predictions(masks, [lam])[0].numpy()
    np.testing.assert_allclose(preds, want @ masks.double().numpy().T, rtol=1e-4,
                               atol=1e-6 * np.abs(want).max())
    own = path.self_influence([lam])[0].numpy()
    want_own = -np.diag(dense_truncated(g, g, lam, 5))
    np.testing.assert_allclose(own, want_own, rtol=1e-4)


@pytest.mark.parametrize(("n", "params"), [(100, {}), (40, {"proj_kind": "identity"})])
def test_the_parameter_form_and_held_gradients_take_the_same_route(n, params):
    """100 examples of 74 parameters (the p x p parameter form) and 40 held gradients (an
    identity projection: the kernel form from rows, not factors): eig_rank=5 scores equal the
    dense truncated formula."""
    ctx, explained, g, v = problem(n=n)
    att = make_attributor("iffim", eig_rank=5, **params).fit(ctx)
    assert att.eigen.form == ("parameter" if n > 74 else "kernel")
    want = dense_truncated(g, v, 1e-2, 5)
    got = att.score(explained, lam=1e-2).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    own = att.lambda_path(explained).self_influence([1e-2])[0].numpy()
    np.testing.assert_allclose(own, -np.diag(dense_truncated(g, g, 1e-2, 5)), rtol=1e-4)


def test_a_rank_at_least_n_is_the_exact_route():
    ctx, explained, g, v = problem()
    att = make_attributor("iffim", eig_rank=40).fit(ctx)
    want = dense_truncated(g, v, 1e-2, None)
    got = att.score(explained, lam=1e-2).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert att.eigen.train_sq is None  # the exact eigendecomposition


def test_the_route_is_said_before_work_above_the_limit(monkeypatch, capsys):
    """Above EXACT_EIGH_LIMIT examples the top-k route is the default and says so (lowered
    here to 30 examples, k to 6); lambda = 0 is refused on it (the rest has no curvature)."""
    monkeypatch.setattr(iffim_module, "EXACT_EIGH_LIMIT", 30)
    monkeypatch.setattr(iffim_module, "TOP_RANK", 6)
    ctx, explained, g, v = problem()
    att = make_attributor("iffim").fit(ctx)
    assert ("the Fisher of 40 training examples x 74 gradient dimensions: its top 6 "
            "eigenpairs") in capsys.readouterr().err
    np.testing.assert_allclose(att.score(explained, lam=1e-2).double().numpy(),
                               dense_truncated(g, v, 1e-2, 6), rtol=1e-4,
                               atol=1e-6 * np.abs(dense_truncated(g, v, 1e-2, 6)).max())
    with pytest.raises(ValueError, match="lambda must be > 0"):
        att.lambda_path(explained).scores(0.0)  # iffim's own lam > 0 check is earlier
    small = make_attributor("iffim").fit(AttributionContext(
        ctx.task, ctx.train.subset(torch.arange(30)), ctx.checkpoints, chunk_size=9))
    assert small.eigen.train_sq is None  # at the limit: exact


def test_the_estimate_counts_the_route():
    """At n = 20,000, from sizes only: the exact route holds eigh's ~4 s^2 float64 numbers
    (s = n for a wide model's kernel, p for 19,500 parameters), the top-1,000 route the
    matrix and a few s x 1,010 blocks, within 8 GiB."""
    from tdatune.features.budget import estimate_attribution

    n, p = 20_000, 5_000_000
    exact = estimate_attribution(n, p, factored_numbers=2_000, explained=100)
    top = estimate_attribution(n, p, factored_numbers=2_000, explained=100, eig_rank=1_000)
    assert exact.eig_size == n and top.eig_size == 1_010
    assert exact.phases["eigendecomposition"]["n x n matrix"] == n * n * 8
    assert top.phases["eigendecomposition"]["range finder blocks"] == 3 * n * 1_010 * 8
    assert top.memory_bytes < 8 * 2**30 < exact.memory_bytes
    assert top.phases["scores"]["products outside the top eigenpairs"] == 100 * n * 8
    # the user's ViT: 20,000 examples of 19,500 parameters, the p x p parameter form
    exact = estimate_attribution(n, 19_500, explained=100)
    top = estimate_attribution(n, 19_500, explained=100, eig_rank=1_000)
    assert (exact.form, exact.eig_size, top.eig_size) == ("parameter", 19_500, 1_010)
    assert top.phases["eigendecomposition"]["range finder blocks"] == 3 * 19_500 * 1_010 * 8
    assert top.memory_bytes < 8 * 2**30 < exact.memory_bytes


def test_iffims_estimate_takes_the_route_by_default(monkeypatch):
    monkeypatch.setattr(iffim_module, "EXACT_EIGH_LIMIT", 30)
    monkeypatch.setattr(iffim_module, "TOP_RANK", 6)
    ctx, explained, _, _ = problem()
    est = attribute_estimate(ctx.task, ctx.train, explained, attributor="iffim")
    assert est.rank == 6 and est.eig_size == 16


def test_eig_rank_names_a_cell_only_away_from_its_default():
    """A sweep cell of IFFIM at eig_rank's default has the identity it had before the
    option existed (its fit values hashed as recorded: checkpoint, proj_dim, proj_kind,
    proj_seed); a given eig_rank is part of the identity."""
    from tdatune.study.spec import spec_from_dict
    from tdatune.study.sweep import expand_cells

    plain = expand_cells(spec_from_dict({"settings": ["digits-lr"],
                                         "methods": [{"name": "iffim"}]}))
    assert [dict(c.fit) for c in plain] == [{"checkpoint": -1, "proj_dim": None,
                                             "proj_kind": "gaussian", "proj_seed": 0}]
    assert plain[0].cell_id == "digits-lr__iffim__a0.5__cd6865c1b2"  # the published cells'
    ranked = expand_cells(spec_from_dict({"settings": ["digits-lr"], "methods": [
        {"name": "iffim", "defaults": {"eig_rank": 50}}]}))
    assert dict(ranked[0].fit)["eig_rank"] == 50
    assert ranked[0].cell_id != plain[0].cell_id


def test_a_quantile_is_read_at_its_place_in_the_whole_spectrum():
    """Ten eigenvalues, the top four held (rank 10), uneven: the 0.9 quantile is 9 - 0.9 x 2
    = 7.2 and the 0.7 quantile 4 - 0.7 x 0.5 = 3.65, as torch.quantile of all ten; the 0.5
    quantile lies below the four held, so the smallest held, 3.5, bounds it."""
    from tdatune.select.quantile import quantile_lambda

    full = torch.tensor([9, 7, 4, 3.5, 2, 1.2, 1, 0.6, 0.5, 0.1], dtype=torch.float64)
    held = full[:4]
    assert quantile_lambda(held, 0.9, rank=10) == pytest.approx(7.2)
    assert quantile_lambda(held, 0.7, rank=10) == pytest.approx(3.65)
    for q in (0.9, 0.7):
        assert quantile_lambda(held, q, rank=10) == pytest.approx(float(torch.quantile(full, q)))
    assert quantile_lambda(held, 0.5, rank=10) == 3.5
    assert quantile_lambda(held, 0.9) == pytest.approx(float(torch.quantile(held, 0.9)))


def test_the_truncated_route_selects_the_quantile_of_the_whole_spectrum():
    """IFFIM's default rule (the 0.9 quantile) on 30 of 40 kernel eigenpairs picks the lambda
    the exact route picks (the quantile's place, 3.9 from the top, is among those held)."""
    from tdatune.select.damping_choice import choose_damping

    ctx, explained, _, _ = problem()
    exact = choose_damping(make_attributor("iffim").fit(ctx), explained)
    top = choose_damping(make_attributor("iffim", eig_rank=30).fit(ctx), explained)
    assert top.rule == exact.rule == "quantile"
    assert top.lam == pytest.approx(exact.lam, rel=1e-8)


@given(ranks=st.lists(st.one_of(st.none(), st.integers(1, 10**6)), min_size=2, max_size=4,
                      unique=True),
       option=st.sampled_from([("iffim", "eig_rank"), ("kfac", "query_rank"),
                               ("kfac", "query_memory")]))
@settings(max_examples=25, deadline=None)
def test_an_option_named_only_away_from_its_default_still_tells_cells_apart(ranks, option):
    """Any two values of eig_rank / query_rank / query_memory give two distinct sweep points
    (fit values for eig_rank, score values for the others), and the default (None) is
    exactly the point without the option."""
    from tdatune.study.spec import spec_from_dict, sub_experiment_points

    method, name = option
    points = []
    for value in ranks:
        defaults = {} if value is None else {name: value}
        spec = spec_from_dict({"settings": ["digits-lr"],
                               "methods": [{"name": method, "defaults": defaults}]})
        point = sub_experiment_points(spec.methods[0])[0]
        named = dict(point.fit) | dict(point.score)
        assert (name in named) == (value is not None)
        if value is not None:
            assert named[name] == value
        points.append((point.fit, tuple(sorted(point.score))))
    assert len(set(points)) == len(ranks)
