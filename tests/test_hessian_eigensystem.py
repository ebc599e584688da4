"""Eigensystems of the training-objective Hessian (Kronecker path for one linear layer, dense
path otherwise) and the Krylov CG lambda-path, against independent dense computations:
torch.autograd.functional.hessian, torch.linalg.solve and a plain CG loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tdatune.curvature.hessian import (
    DenseEigensystem,
    KroneckerEigensystem,
    TrainingObjective,
    krylov_cg_path,
)
from tdatune.data.base import ArrayDataset
from tdatune.models.small import MLP, LogisticRegression
from tdatune.models.task import Task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def half_squared_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0.5 ||z - onehot(y)||^2 + 0.1 sum z^4 / 4 per example: a loss whose logit Hessian
    is full rank and varies across examples (unlike softmax cross-entropy)."""
    onehot = torch.eye(logits.shape[1], dtype=logits.dtype)[targets]
    return 0.5 * ((logits - onehot) ** 2).sum(1) + 0.025 * (logits**4).sum(1)


def setup(model: nn.Module, loss=None, n: int = 40, d: int = 12, classes: int = 4,
          zero_cols: tuple[int, ...] = (2, 7), seed: int = 0
          ) -> tuple[Task, nn.Module, dict[str, torch.Tensor], ArrayDataset]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, list(zero_cols)] = 0.0  # features never active: exact weight-decay eigenvectors
    y = torch.randint(0, classes, (n,), generator=gen)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    task = Task(make_model=lambda: model) if loss is None else Task(make_model=lambda: model,
                                                                    loss_fn=loss)
    return task, model, params, ArrayDataset(x, y)


def dense_reference(task: Task, model: nn.Module, params: dict[str, torch.Tensor],
                    data: ArrayDataset, wd: float) -> torch.Tensor:
    """Hessian of mean loss + wd/2 ||theta||^2 by torch.autograd.functional.hessian."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].reshape(-1) for k in names])

    def objective(theta: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (t.reshape(s) for t, s in
                                 zip(theta.split(sizes), shapes, strict=True)), strict=True))
        out = torch.func.functional_call(model, parts, (data.inputs,))
        return task.loss_fn(out, data.targets).mean() + 0.5 * wd * (theta * theta).sum()

    return torch.autograd.functional.hessian(objective, flat)


@pytest.mark.parametrize("loss", [None, half_squared_error])
@pytest.mark.parametrize("bias", [True, False])
def test_kronecker_eigensystem_reconstructs_the_dense_hessian(loss, bias):
    model = LogisticRegression(12, 4)
    if not bias:
        model.linear = nn.Linear(12, 4, bias=False)
    task, model, params, data = setup(model, loss)
    wd = 1e-2
    obj = TrainingObjective(task, model, params, data, wd, chunk_size=16)
    eig = obj.eigensystem()
    assert isinstance(eig, KroneckerEigensystem)
    ref = dense_reference(task, model, params, data, wd)
    u, sigma = eig.basis, eig.sigma
    p = ref.shape[0]
    assert u.shape == (p, p) and bool((sigma[:-1] >= sigma[1:]).all())
    torch.testing.assert_close(u.T @ u, torch.eye(p, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(u @ torch.diag(sigma) @ u.T, ref, atol=1e-11, rtol=1e-10)
    # the deflated block: softmax drops one class direction, never the zero input columns
    width = 12 - 2 + int(bias)
    assert eig.rx == width and eig.rc == (3 if loss is None else 4)
    v = torch.randn(5, p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(eig.coords(v), v @ u, atol=1e-12, rtol=0)


def test_dense_eigensystem_for_an_mlp_and_float32_precision():
    task, model, params, data = setup(MLP(12, (5,), 4), n=30)
    obj = TrainingObjective(task, model, params, data, 1e-3, chunk_size=7)
    ref = dense_reference(task, model, params, data, 1e-3)
    eig = obj.eigensystem()
    assert isinstance(eig, DenseEigensystem)
    torch.testing.assert_close(eig.basis @ torch.diag(eig.sigma) @ eig.basis.T, ref,
                               atol=1e-11, rtol=1e-10)
    assert float(eig.sigma.min()) < 0  # an MLP away from a minimum: indefinite, kept signed
    lr_task, lr_model, lr_params, lr_data = setup(LogisticRegression(12, 4))
    lr_obj = TrainingObjective(lr_task, lr_model, lr_params, lr_data, 1e-2)
    e32 = lr_obj.eigensystem(torch.float32)
    ref = dense_reference(lr_task, lr_model, lr_params, lr_data, 1e-2)
    u = e32.basis.double()
    torch.testing.assert_close(u @ torch.diag(e32.sigma.double()) @ u.T, ref, atol=1e-5, rtol=1e-5)


def test_linear_layer_detection_refuses_other_models():
    task, model, params, data = setup(MLP(12, (5,), 4))
    assert TrainingObjective(task, model, params, data).linear_layer() is None

    class Scaled(nn.Module):  # one Linear, but the logits are not linear(x.flatten(1))
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(12, 4)

        def forward(self, x):
            return self.linear(torch.tanh(x))

    task, model, params, data = setup(Scaled())
    assert TrainingObjective(task, model, params, data).linear_layer() is None


def reference_cg(a: torch.Tensor, b: torch.Tensor, iters: int, x0: torch.Tensor) -> torch.Tensor:
    """Plain CG on a x = b from x0 (dattri 0.3.0's loop)."""
    x = x0.clone()
    r = b - a @ x
    d = r.clone()
    for _ in range(iters):
        ad = a @ d
        alpha = (r @ r) / (d @ ad)
        x = x + alpha * d
        r_new = r - alpha * ad
        d = r_new + (r_new @ r_new) / (r @ r) * d
        r = r_new
    return x


@pytest.mark.parametrize("x0", ["zero", "rhs"])
def test_krylov_cg_path_equals_cg_at_every_lambda(x0):
    gen = torch.Generator().manual_seed(3)
    p, m = 30, 7
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    h = q @ torch.diag(torch.logspace(-3, 1, p, dtype=torch.float64)) @ q.T
    v = torch.randn(m, p, generator=gen, dtype=torch.float64)
    probes = torch.randn(4, p, generator=gen, dtype=torch.float64)
    lambdas = [1e-3, 1e-2, 0.3, 2.0]
    path = krylov_cg_path(lambda z: z @ h, v, probes, iters=6, x0=x0, batch=3)
    got = path.probe_products(lambdas)  # [L, m, P]
    eye = torch.eye(p, dtype=torch.float64)
    for li, lam in enumerate(lambdas):
        for j in range(m):
            start = v[j].clone() if x0 == "rhs" else torch.zeros(p, dtype=torch.float64)
            x = reference_cg(h + lam * eye, v[j], 6, start)
            torch.testing.assert_close(got[li, j], probes @ x, atol=1e-9, rtol=1e-8)
    # with as many steps as dimensions, CG is the exact solve
    full = krylov_cg_path(lambda z: z @ h, v[:2], probes, iters=p, x0="zero")
    exact = probes @ torch.linalg.solve(h + 0.3 * eye, v[:2].T)
    torch.testing.assert_close(full.probe_products([0.3])[0], exact.T, atol=1e-6, rtol=1e-6)


def test_hvp_matches_the_dense_hessian():
    task, model, params, data = setup(MLP(12, (5,), 4), n=30)
    obj = TrainingObjective(task, model, params, data, 1e-3, chunk_size=7)
    ref = dense_reference(task, model, params, data, 1e-3)
    v = torch.randn(3, ref.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(obj.hvp(v), v @ ref, atol=1e-12, rtol=1e-10)
