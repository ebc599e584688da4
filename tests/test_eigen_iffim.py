"""Eigensystem and IFFIM against dense solves; kernel form equals parameter form."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from tdatune.attributors.base import AttributionContext
from tdatune.attributors.iffim import IFFIM
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.curvature.eigen import fisher_eigensystem
from tdatune.features.gradients import per_example_grads
from tdatune.features.projection import Projector
from tdatune.models.small import LogisticRegression
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe, train_model

LAMBDAS = [1e-5, 1e-3, 1e-1, 10.0]


@pytest.fixture(scope="module")
def trained(digits_small):
    task = Task(make_model=partial(LogisticRegression, 64, 10))
    recipe = TrainRecipe(optimizer="lbfgs", epochs=2, lbfgs_iters=50, weight_decay=1e-2)
    result = train_model(task, digits_small.train, recipe, seed=0)
    ctx = AttributionContext(task, digits_small.train, result.checkpoints, weight_decay=1e-2,
                             device="cpu")
    model, params = ctx.model_at(-1)
    g = per_example_grads(task, model, params, digits_small.train, target="loss").double()
    v = per_example_grads(task, model, params, digits_small.test, target="output").double()
    return ctx, g, v


def _dense_scores(g, v, lam):
    n, p = g.shape
    fisher = g.T @ g / n
    return -(torch.linalg.solve(fisher + lam * torch.eye(p, dtype=g.dtype), v.T).T @ g.T)


def test_parameter_form_reconstructs_fisher():
    g = torch.randn(40, 12, dtype=torch.float64)
    eig = fisher_eigensystem(g, form="parameter")
    fisher = g.T @ g / 40
    torch.testing.assert_close(eig.basis @ torch.diag(eig.sigma) @ eig.basis.T, fisher)
    torch.testing.assert_close(eig.train_coords, g @ eig.basis)


@pytest.mark.parametrize("n,p", [(15, 40), (40, 15)])
def test_kernel_and_parameter_forms_agree(n, p):
    torch.manual_seed(0)
    g = torch.randn(n, p, dtype=torch.float64)
    v = torch.randn(6, p, dtype=torch.float64)
    a = fisher_eigensystem(g, form="parameter", chunk_rows=7)
    b = fisher_eigensystem(g, form="kernel", chunk_rows=7)
    torch.testing.assert_close(a.sigma, b.sigma)
    for lam in LAMBDAS:
        sa = LambdaPath(a.sigma, a.coords(v), a.train_coords).scores(lam)
        sb = LambdaPath(b.sigma, b.coords(v), b.train_coords).scores(lam)
        torch.testing.assert_close(sa, sb)
        torch.testing.assert_close(sa, _dense_scores(g, v, lam), rtol=1e-6, atol=1e-8)


def test_iffim_equals_dense_solve(trained, digits_small):
    ctx, g, v = trained
    att = IFFIM().fit(ctx)
    for lam in LAMBDAS:
        got = att.score(digits_small.test, lam=lam).double()
        want = _dense_scores(g, v, lam)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4 * float(want.abs().max()))


def test_iffim_projected_equals_dense_solve_on_projected_gradients(trained, digits_small):
    ctx, g, v = trained
    att = IFFIM(proj_dim=48, proj_kind="rademacher", proj_seed=7).fit(ctx)
    pmat = Projector(g.shape[1], 48, kind="rademacher", seed=7).matrix().double()
    for lam in LAMBDAS:
        want = _dense_scores(g @ pmat, v @ pmat, lam)
        got = att.score(digits_small.test, lam=lam).double()
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4 * float(want.abs().max()))


def test_identity_projection_equals_no_projection(trained, digits_small):
    ctx, _, _ = trained
    plain = IFFIM().fit(ctx).score(digits_small.test, lam=1e-3)
    ident = IFFIM(proj_kind="identity").fit(ctx).score(digits_small.test, lam=1e-3)
    torch.testing.assert_close(plain, ident)


def test_lambda_path_subset_predictions_equal_per_lambda_scores(trained, digits_small):
    ctx, _, _ = trained
    path = IFFIM().fit(ctx).lambda_path(digits_small.test)
    masks = torch.rand(9, len(digits_small.train), generator=torch.Generator().manual_seed(0)) < 0.5
    preds = path.subset_predictions(masks, LAMBDAS)
    for k, lam in enumerate(LAMBDAS):
        torch.testing.assert_close(preds[k], path.scores(lam) @ masks.double().T)


def test_iffim_bad_input(trained, digits_small):
    ctx, _, _ = trained
    att = IFFIM().fit(ctx)
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            att.score(digits_small.test, lam=bad)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        IFFIM(damping=1.0)
    with pytest.raises(ValueError, match="projection dim"):
        IFFIM(proj_dim=10_000).fit(ctx)
    with pytest.raises(ValueError, match="fit-stage"):
        att.score(digits_small.test, proj_dim=3)
    with pytest.raises(ValueError, match="shape"):
        LambdaPath(torch.ones(3), torch.ones(2, 4), torch.ones(5, 3))


def test_loading_a_checkpoint_leaves_the_global_rng_alone(trained):
    ctx, _, _ = trained
    fresh = AttributionContext(ctx.task, ctx.train, ctx.checkpoints, device="cpu")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fresh.model_at(-1)
    torch.testing.assert_close(torch.rand(3), expected)
