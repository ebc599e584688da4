"""The Hessian of the training objective: Hessian-vector products and the exact Hessian.

The training objective is the one ``models.training`` minimises,

    L(theta) = (1/n) sum_i l(z_i; theta) + weight_decay / 2 * ||theta||^2,

so its Hessian is H = (1/n) sum_i grad^2 l(z_i; theta) + weight_decay * I. Everything here
works on one flat parameter vector (the trainable parameters concatenated in ``params``
order, the same order as ``features.gradients.flatten``) and runs over the data in chunks,
so memory stays bounded in n. HVPs are forward-over-reverse (``jvp`` of ``grad``) and are
batched over several vectors with ``vmap``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jvp, vmap

from tdatune.data.base import ArrayDataset
from tdatune.models.task import Params, Task

EXACT_HESSIAN_MAX_PARAMS = 12_000


def flatten_params(params: Params) -> torch.Tensor:
    """The parameters as one flat vector, in dict order."""
    return torch.cat([v.detach().reshape(-1) for v in params.values()])


def unflatten_params(flat: torch.Tensor, like: Params) -> Params:
    """Split a flat vector back into tensors shaped like ``like`` (same order)."""
    out, start = {}, 0
    for name, ref in like.items():
        out[name] = flat[start : start + ref.numel()].reshape(ref.shape)
        start += ref.numel()
    if start != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, parameters need {start}")
    return out


def cast_problem(model: nn.Module, params: Params, data: ArrayDataset,
                 dtype: torch.dtype) -> tuple[nn.Module, Params, ArrayDataset]:
    """Copies of model, parameters and (floating) inputs in ``dtype`` (e.g. float64 for
    exact curvature); integer inputs such as tokens are left as they are."""
    model = copy.deepcopy(model).to(dtype)
    params = {k: v.detach().to(dtype) for k, v in params.items()}
    inputs = data.inputs.to(dtype) if data.inputs.is_floating_point() else data.inputs
    return model, params, ArrayDataset(inputs, data.targets)


class TrainingObjective:
    """Curvature of the training objective at ``params`` on ``data`` (mean loss + L2)."""

    def __init__(self, task: Task, model: nn.Module, params: Params, data: ArrayDataset,
                 weight_decay: float = 0.0, chunk_size: int = 256) -> None:
        if len(data) == 0:
            raise ValueError("the training set is empty: the objective has no curvature")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.task, self.model, self.params = task, model, params
        self.data, self.weight_decay, self.chunk_size = data, float(weight_decay), chunk_size
        self.theta = flatten_params(params)
        self.device = self.theta.device
        model.eval()

    @property
    def p(self) -> int:
        """Number of parameters."""
        return int(self.theta.numel())

    @property
    def n(self) -> int:
        """Number of training examples."""
        return len(self.data)

    def _summed_loss(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        like, model, loss_fn = self.params, self.model, self.task.loss_fn

        def summed(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = functional_call(model, unflatten_params(flat, like), (x,))
            return loss_fn(logits, y).sum()
        return summed

    def _batches(self, index: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.data.inputs, self.data.targets
        if index is not None:
            x, y = x[index], y[index]
        return [(x[s : s + self.chunk_size].to(self.device), y[s : s + self.chunk_size].to(self.device))
                for s in range(0, x.shape[0], self.chunk_size)]

    def hvp(self, vectors: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """H @ v for each row of ``vectors`` [b, p] (or a single [p]); with ``index``, the
        Hessian of the mean loss over those training examples only (plus the L2 term)."""
        single = vectors.dim() == 1
        vecs = vectors[None] if single else vectors
        if vecs.shape[-1] != self.p:
            raise ValueError(f"vectors have {vecs.shape[-1]} entries, the model has p={self.p}")
        vecs = vecs.to(self.device, self.theta.dtype)
        summed = self._summed_loss()
        g = grad(summed)
        theta = self.theta
        out = torch.zeros_like(vecs)
        count = 0
        for x, y in self._batches(index):
            def one(v: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                return jvp(lambda t: g(t, x, y), (theta,), (v,))[1]
            out += vmap(one)(vecs)
            count += x.shape[0]
        out = out / count + self.weight_decay * vecs
        return out[0] if single else out

    def gradient(self) -> torch.Tensor:
        """Gradient of the objective (about zero at a minimum; useful as a check)."""
        summed = self._summed_loss()
        total = torch.zeros_like(self.theta)
        for x, y in self._batches(None):
            total += grad(summed)(self.theta, x, y)
        return total / self.n + self.weight_decay * self.theta

    def exact(self, max_params: int = EXACT_HESSIAN_MAX_PARAMS) -> torch.Tensor:
        """The dense p x p Hessian (symmetrised), for models with at most ``max_params``."""
        if self.p > max_params:
            raise ValueError(
                f"the exact Hessian of {self.p} parameters needs a {self.p} x {self.p} matrix; "
                f"if_explicit is limited to p <= {max_params}. Use if_cg or if_lissa (HVPs) or "
                "iffim/logra/trak for this model"
            )
        summed = self._summed_loss()
        h = torch.zeros(self.p, self.p, dtype=self.theta.dtype, device=self.device)
        for x, y in self._batches(None):
            h += hessian(summed)(self.theta, x, y)
        h = h / self.n
        h = 0.5 * (h + h.T)
        h.diagonal().add_(self.weight_decay)
        return h

    def top_eigenvalue(self, iters: int = 20, seed: int = 0,
                       index: torch.Tensor | None = None) -> float:
        """Power-iteration estimate of the largest |eigenvalue| of H (from below)."""
        return power_iteration(lambda v: self.hvp(v, index), self.p, iters=iters, seed=seed,
                               dtype=self.theta.dtype, device=self.device)


def power_iteration(matvec: Callable[[torch.Tensor], torch.Tensor], p: int, *, iters: int = 20,
                    seed: int = 0, dtype: torch.dtype = torch.float64,
                    device: torch.device | str = "cpu") -> float:
    """Estimate the largest |eigenvalue| of a symmetric operator by ``iters`` power steps."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(p, generator=gen, dtype=dtype).to(device)
    v /= v.norm()
    estimate = 0.0
    for _ in range(max(1, iters)):
        w = matvec(v)
        norm = w.norm()  # ||H v|| for unit v: a lower bound on the top |eigenvalue|
        if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
            break
        estimate = max(estimate, float(norm))
        v = w / norm
    return estimate
