"""IF explicit / CG / LiSSA against a dense solve with the autograd Hessian."""

from __future__ import annotations

import itertools

import pytest
import torch

from attr_problems import dense_if, problem, rel_err
from tdatune.attributors import LiSSADivergence, make_attributor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dense_lr():
    prob = problem("lr")
    return {lam: dense_if(prob, lam) for lam in (1e-5, 1e-2, 0.5)}


@pytest.mark.parametrize("kind", ["lr", "mlp"])
def test_if_explicit_equals_dense_solve(kind, dense_lr):
    prob = problem(kind)
    attr = make_attributor("if_explicit").fit(prob.context)
    for lam in (1e-5, 1e-2):
        ref = dense_lr[lam] if kind == "lr" else dense_if(prob, lam)
        assert rel_err(attr.score(prob.explained, lam=lam), ref) < 1e-5, (kind, lam)


def test_if_explicit_refuses_singular_lambda():
    prob = problem("mlp")
    attr = make_attributor("if_explicit").fit(prob.context)
    assert torch.equal(attr.sigma, attr.sigma.sort(descending=True).values)
    sigma_min = float(attr.sigma.min())
    if sigma_min < 0:  # indefinite Hessian: lam = -sigma_min is exactly singular
        with pytest.raises(ValueError, match="singular"):
            attr.score(prob.explained, lam=-sigma_min)
    assert attr.indefinite(1e9) is False


def test_cg_converges_to_explicit(dense_lr):
    prob = problem("lr")
    attr = make_attributor("if_cg").fit(prob.context)
    ref = dense_lr[1e-2]
    grid = [{"lam": 1e-2, "max_iter": k, "early_stop": False} for k in (1, 3, 10, 30, 80)]
    errs = [rel_err(s, ref) for _, s in attr.score_grid(prob.explained, grid)]
    assert all(b <= a * 1.05 for a, b in itertools.pairwise(errs)), errs
    assert errs[0] > 0.05 and errs[-1] < 1e-4, errs
    # early stopping reaches the same answer; iterates from the grid equal fresh runs
    assert rel_err(attr.score(prob.explained, lam=1e-2, max_iter=200), ref) < 1e-4
    fresh = make_attributor("if_cg").fit(prob.context)
    again = fresh.score(prob.explained, lam=1e-2, max_iter=10, early_stop=False)
    assert torch.allclose(again, dict(zip([3, 10], [s for _, s in attr.score_grid(
        prob.explained, [{"lam": 1e-2, "max_iter": k, "early_stop": False} for k in (3, 10)])],
        strict=True))[10], rtol=1e-5, atol=1e-7)


def test_cg_continues_a_cached_run():
    prob = problem("lr")
    attr = make_attributor("if_cg").fit(prob.context)
    five = attr.score(prob.explained, lam=1e-2, max_iter=5, early_stop=False)
    run = next(iter(attr._runs.values()))
    assert run.it == 5
    twelve = attr.score(prob.explained, lam=1e-2, max_iter=12, early_stop=False)
    assert run.it == 12  # continued, not restarted
    fresh = make_attributor("if_cg").fit(prob.context)
    assert torch.allclose(twelve, fresh.score(prob.explained, lam=1e-2, max_iter=12,
                                              early_stop=False), rtol=1e-6, atol=1e-8)
    assert not torch.allclose(five, twelve)


def test_lissa_full_batch_converges_to_explicit(dense_lr):
    prob = problem("lr")
    attr = make_attributor("if_lissa").fit(prob.context)
    top = attr.top_eigenvalue
    scores = attr.score(prob.explained, lam=0.5, scale=top + 0.5, depth=150,
                        batch_size=len(prob.train))
    assert rel_err(scores, dense_lr[0.5]) < 1e-4


def test_lissa_stochastic_approaches_explicit(dense_lr):
    prob = problem("lr")
    attr = make_attributor("if_lissa").fit(prob.context)
    grid = [{"lam": 0.5, "scale": 2 * attr.top_eigenvalue, "depth": d, "batch_size": 15}
            for d in (1, 300)]
    (_, shallow), (_, deep) = list(attr.score_grid(prob.explained, grid))
    ref = dense_lr[0.5]
    assert rel_err(deep, ref) < 0.2 < rel_err(shallow, ref)
    corr = torch.corrcoef(torch.stack([deep.flatten().double(), ref.flatten()]))[0, 1]
    assert corr > 0.97


def test_lissa_refuses_small_scale_and_stops_on_divergence():
    prob = problem("lr")
    attr = make_attributor("if_lissa").fit(prob.context)
    with pytest.raises(ValueError, match=r"scale=.* is too small"):
        attr.score(prob.explained, scale=attr.top_eigenvalue / 4, depth=10)
    attr.top_eigenvalue = 1e-6  # pretend the estimate missed the curvature
    with pytest.raises(LiSSADivergence, match=r"scale=0\.05 is too small"):
        attr.score(prob.explained, scale=0.05, depth=500)
