"""Tiny trained problems and independent (loop / dense autograd) reference computations for the
attributor tests."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
from torch.func import functional_call

from tdatune.attributors.base import AttributionContext
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.data.base import ArrayDataset
from tdatune.data.digits import load_digits_splits
from tdatune.models.small import MLP, LogisticRegression
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe, train_model


@dataclass
class Problem:
    """A trained tiny model with its context and explained examples."""

    task: Task
    train: ArrayDataset
    explained: ArrayDataset
    context: AttributionContext
    weight_decay: float


_CACHE: dict[tuple, Problem] = {}


def problem(kind: str = "lr", n_train: int = 60, n_explained: int = 8,
            learning_rates: bool = False) -> Problem:
    """Digits + logistic regression (L-BFGS) or a 64-8-10 MLP (SGD, 6 epochs), cached."""
    key = (kind, n_train, n_explained, learning_rates)
    if key in _CACHE:
        return _CACHE[key]
    splits = load_digits_splits(n_train=n_train, n_val=0, n_test=n_explained, seed=3)
    if kind == "lr":
        task = Task(make_model=partial(LogisticRegression, 64, 10), name="t-lr")
        recipe = TrainRecipe(optimizer="lbfgs", epochs=3, lbfgs_iters=100, weight_decay=1e-2)
    else:
        task = Task(make_model=partial(MLP, 64, (8,), 10), name="t-mlp")
        recipe = TrainRecipe(optimizer="sgd", epochs=6, lr=0.1, batch_size=16, momentum=0.9,
                             weight_decay=1e-3)
    result = train_model(task, splits.train, recipe, seed=0)
    lrs = [0.1 * (1 + e) for e in range(recipe.epochs)] if learning_rates else None
    ctx = AttributionContext(task, splits.train, result.checkpoints,
                             weight_decay=recipe.weight_decay, learning_rates=lrs, chunk_size=25)
    _CACHE[key] = Problem(task, splits.train, splits.test, ctx, recipe.weight_decay)
    return _CACHE[key]


def model64(prob: Problem, checkpoint: int = -1) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A float64 copy of the model at ``checkpoint`` and its parameters."""
    model, params = prob.context.model_at(checkpoint)
    m = copy.deepcopy(model).double()
    return m, {k: v.detach().double() for k, v in params.items()}


def loop_grads(prob: Problem, data: ArrayDataset, fn: str, checkpoint: int = -1,
               names: list[str] | None = None) -> torch.Tensor:
    """Per-example gradients [n, p] by one torch.autograd.grad call per example (float64).
    ``fn``: 'loss', 'output' (task's output function) or 'margin'."""
    from tdatune.models.outputs import margin

    m, params = model64(prob, checkpoint)
    names = names or list(params)
    func = {"loss": prob.task.loss_fn, "output": prob.task.output_fn, "margin": margin}[fn]
    rows = []
    for i in range(len(data)):
        p = {k: v.clone().requires_grad_(k in names) for k, v in params.items()}
        out = functional_call(m, p, (data.inputs[i : i + 1].double(),))
        value = func(out, data.targets[i : i + 1])[0]
        grads = torch.autograd.grad(value, [p[k] for k in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def dense_hessian(prob: Problem, checkpoint: int = -1) -> torch.Tensor:
    """Hessian of mean loss + wd/2 ||theta||^2 by torch.autograd.functional.hessian (float64)."""
    m, params = model64(prob, checkpoint)
    shapes = [(k, v.shape, v.numel()) for k, v in params.items()]
    flat = torch.cat([v.reshape(-1) for v in params.values()])
    x, y = prob.train.inputs.double(), prob.train.targets

    def objective(theta: torch.Tensor) -> torch.Tensor:
        p, s = {}, 0
        for k, shape, size in shapes:
            p[k] = theta[s : s + size].reshape(shape)
            s += size
        loss = prob.task.loss_fn(functional_call(m, p, (x,)), y).mean()
        return loss + 0.5 * prob.weight_decay * (theta * theta).sum()

    return torch.autograd.functional.hessian(objective, flat)


def dense_if(prob: Problem, lam: float) -> torch.Tensor:
    """-V (H + lam I)^-1 G^T with the dense Hessian and loop gradients."""
    h = dense_hessian(prob)
    v = loop_grads(prob, prob.explained, "output")
    g = loop_grads(prob, prob.train, "loss")
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return -v @ torch.linalg.solve(h + lam * eye, g.T)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def fisher_problem(n: int, p: int, m: int, generator: torch.Generator, decades: float = 2.0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, LambdaPath]:
    """Random gradients G [n, p] (column scales spanning ``decades``), explained gradients V
    [m, p], their Fisher F = G^T G / n and its lambda-path (eigenbasis by a dense eigh)."""
    G = torch.randn(n, p, generator=generator, dtype=torch.float64) * torch.logspace(
        0, -decades, p, dtype=torch.float64)
    V = torch.randn(m, p, generator=generator, dtype=torch.float64)
    F = G.T @ G / n
    sigma, U = torch.linalg.eigh(F)
    return G, V, F, LambdaPath(sigma, V @ U, G @ U)
