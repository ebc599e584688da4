"""Train M models of one task at once with stacked parameters (torch.func + vmap).

Each model m is trained on its own subset of the training data with its own seed, and ends
where ``train_model(task, train.subset(mask_m), recipe, seed_m)`` ends (float tolerance):

* SGD / Adam: model m starts from ``init_model(task, seed_m)`` and visits its subset in the
  order ``epoch_permutation(|S_m|, seed_m, epoch)``, gathered as an ``[M, B]`` index tensor
  into the shared training data. All subsets have the same size, so the M models take their
  steps in lock-step. The loss of the M models is summed (their parameters are disjoint, so
  each gradient is exactly the model's own) and a single torch optimizer updates the stacked
  parameters; SGD with momentum and Adam are element-wise, so this is the same update as M
  separate optimizers. Gradient clipping is applied per model.
* L-BFGS (convex objectives such as logistic regression with weight decay, whose minimiser is
  unique): a batched L-BFGS with a per-model history, per-model step sizes (Armijo
  backtracking) and per-model stopping, on the objective ``sum_i w_mi l_i / |S_m| + wd/2
  ||theta_m||^2`` where ``w_m`` is model m's subset membership. Running torch's L-BFGS on the
  joint vector of all M models would couple their step sizes and histories and stop on a
  joint criterion; the per-model version converges to each model's own minimiser, the point
  ``train_model`` approaches too. It runs at most ``epochs * lbfgs_iters`` iterations (the
  budget ``train_model`` has) and stops a model earlier once its objective can no longer
  decrease in floating point. A model that exhausts the budget before converging is
  retrained alone by :func:`retrain_outputs_batched` (its result is then defined by the
  budget, which only ``train_model`` reproduces).

Models with BatchNorm or dropout (batch statistics and random masks would need per-model
state and random streams) are refused with :class:`BatchedTrainingUnsupported`; callers fall
back to training them one at a time.

The models of a chunk finish together, so a kill loses the chunk in flight.
:class:`ChunkPlanner` bounds that loss to about a minute of work: a first chunk of
``FIRST_CHUNK_MODELS`` (10), then chunks predicted, from the measured time per model, to take
at most ``MAX_CHUNK_SECONDS`` (60). A fixed count of ten models per chunk would cost up to
~40% of the speed on MLPs (each chunk pays the per-step overhead of the lock-step loop).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from tdatune.data.base import ArrayDataset
from tdatune.models.linear_chain import ChainStepper, chain_for, chain_models_in_cache
from tdatune.models.outputs import cross_entropy
from tdatune.models.task import Params, Task
from tdatune.models.training import (
    TrainRecipe,
    epoch_permutation,
    init_model,
    make_optimizer,
    objective,
    train_model,
)
from tdatune.utils.atomic import (
    DamagedFileError,
    atomic_torch_save,
    atomic_write_json,
    is_intact,
    notice,
    read_json,
    remove_with_record,
    torch_load_verified,
)
from tdatune.utils.fingerprint import fingerprint_config, fingerprint_tensors
from tdatune.utils.memory import last_level_cache_bytes
from tdatune.utils.progress import progress

# Modules whose behaviour in training mode couples examples or draws random numbers.
_UNSUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

LBFGS_HISTORY = 20
LBFGS_C1 = 1e-4
LBFGS_MAX_BACKTRACK = 30
LBFGS_TOL_GRAD = 1e-10
LBFGS_TOL_CHANGE = 1e-14
DEFAULT_CPU_BUDGET = 2 << 30  # bytes of working memory a CPU chunk may use
FIRST_CHUNK_MODELS = 10  # the first batched chunk, before any time is measured
MAX_CHUNK_SECONDS = 60.0  # later chunks: about this much work, what a kill may lose


class BatchedTrainingUnsupported(ValueError):
    """The model cannot be trained in the batched path; train it one model at a time."""


def check_batchable(task: Task) -> None:
    """Refuse models with BatchNorm, dropout or buffers, naming the offending module."""
    model = task.make_model()
    for name, module in model.named_modules():
        if isinstance(module, _UNSUPPORTED_MODULES):
            raise BatchedTrainingUnsupported(
                f"{task.name}: module {name or '<root>'} ({type(module).__name__}) uses batch "
                "statistics or random masks, which batched retraining does not reproduce; "
                "use the sequential or process backend for this model"
            )
    buffers = [k for k, _ in model.named_buffers()]
    if buffers:
        raise BatchedTrainingUnsupported(
            f"{task.name}: the model has buffers ({', '.join(buffers[:3])}), which batched "
            "retraining does not track; use the sequential or process backend for this model"
        )


def supports_batched(task: Task) -> bool:
    """Whether ``task``'s model can be trained by :func:`train_batched`."""
    try:
        check_batchable(task)
    except BatchedTrainingUnsupported:
        return False
    return True


@dataclass
class BatchedResult:
    """Stacked final parameters ``[M, ...]`` of M models, their final training objectives and
    (L-BFGS) the iterations each took and whether it converged before the iteration budget."""

    params: Params
    objectives: torch.Tensor
    iterations: torch.Tensor | None = None
    converged: torch.Tensor | None = None

    @property
    def num_models(self) -> int:
        """M, the number of stacked models."""
        return int(self.objectives.shape[0])

    def state(self, m: int) -> Params:
        """Model m's parameters as an ordinary state dict (loadable with load_state_dict)."""
        return {k: v[m].detach().clone() for k, v in self.params.items()}


def subset_indices(masks: torch.Tensor) -> torch.Tensor:
    """``[M, s]`` ascending example indices of M boolean masks that all have s members."""
    if masks.dim() != 2 or masks.dtype != torch.bool:
        raise ValueError(f"subset masks must be a boolean [M, n] tensor, got {masks.dtype} "
                         f"{list(masks.shape)}")
    sizes = masks.sum(1)
    if masks.shape[0] == 0 or bool((sizes != sizes[0]).any()) or int(sizes[0]) == 0:
        raise ValueError(
            "batched training needs M >= 1 non-empty subsets of one common size (steps must "
            f"align); got sizes {sorted(set(sizes.tolist()))}"
        )
    return masks.nonzero()[:, 1].reshape(masks.shape[0], int(sizes[0]))


def train_batched(
    task: Task, train: ArrayDataset, masks: torch.Tensor, recipe: TrainRecipe,
    seeds: Sequence[int], *, device: torch.device | str = "cpu", show_progress: bool = False,
    state_path: str | Path | None = None, save_seconds: float | None = None,
) -> BatchedResult:
    """Train M models at once, model m on ``train.subset(masks[m])`` with seed ``seeds[m]``.

    With ``state_path`` (SGD / Adam recipes), the stacked parameters and optimizer state are
    saved there (atomically, verified on read) after an epoch once ``save_seconds`` (default
    ``MAX_CHUNK_SECONDS``) have passed since the last save, and a run that finds a state of the
    same models, recipe and subsets there resumes after its epoch: a kill loses at most about
    ``save_seconds`` of work, and the resumed models equal uninterrupted ones bitwise. The caller deletes the
    file once the models are stored.
    """
    check_batchable(task)
    masks = torch.as_tensor(masks)
    if len(seeds) != masks.shape[0]:
        raise ValueError(f"got {masks.shape[0]} subset masks but {len(seeds)} seeds; one seed "
                         "per model is needed")
    if masks.shape[1] != len(train):
        raise ValueError(f"subset masks cover {masks.shape[1]} examples but the training set "
                         f"has {len(train)}")
    device = torch.device(device)
    models = [init_model(task, int(s), device) for s in seeds]
    params, _ = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    if recipe.optimizer == "lbfgs":
        return _train_lbfgs(task, base, params, train, masks, recipe, device, show_progress,
                            models[0])
    model = models[0]
    del models
    every = MAX_CHUNK_SECONDS if save_seconds is None else save_seconds
    state = None if state_path is None else _ChunkState(Path(state_path), every,
                                                        _chunk_key(task, recipe, masks, seeds))
    return _train_minibatch(task, base, params, train, masks, recipe, seeds, device,
                            show_progress, model, state)


def _chunk_key(task: Task, recipe: TrainRecipe, masks: torch.Tensor,
               seeds: Sequence[int]) -> str:
    """What identifies a chunk's training: the task's identity (every field by content, the
    model's architecture), recipe, subsets and seeds."""
    from tdatune.models.identity import task_identity

    return fingerprint_config({"task": task_identity(task), "recipe": recipe.to_dict(),
                               "seeds": [int(x) for x in seeds],
                               "masks": fingerprint_tensors(masks.cpu())})


@dataclass
class _ChunkState:
    """Where a chunk's in-flight training state is saved, how often, and for what."""

    path: Path
    save_seconds: float
    key: str
    last_save: float = 0.0

    def load(self, device: torch.device, kind: str) -> dict | None:
        """The state saved by the same path (``kind``) for this chunk, else None (a damaged
        one is said)."""
        if not self.path.exists():
            return None
        try:
            saved = torch_load_verified(self.path, map_location=device)
        except DamagedFileError as err:
            notice(f"{self.path} (an in-flight batched chunk) is damaged ({err.reason}); "
                   "training the chunk from the start")
            return None
        if (not isinstance(saved, dict) or saved.get("key") != self.key
                or saved.get("path") != kind):
            return None
        notice(f"resuming a batched chunk of {len(saved['objectives'])} models after epoch "
               f"{saved['epoch'] + 1} from {self.path}")
        return saved

    def maybe_save(self, epoch: int, stepper: _Stepper, objectives: torch.Tensor) -> None:
        """Save after ``epoch`` when ``save_seconds`` have passed since the last save."""
        now = time.perf_counter()
        if now - self.last_save < self.save_seconds:
            return
        atomic_torch_save(self.path, {"key": self.key, "epoch": epoch, "objectives": objectives,
                                      "path": stepper.kind, "state": stepper.state()})
        self.last_save = time.perf_counter()


class _Stepper(Protocol):
    """One lock-step optimiser step of M stacked models (autograd, or a written-out chain)."""

    kind: str

    def step(self, idx: torch.Tensor, lr: float) -> torch.Tensor: ...
    def state(self) -> dict: ...
    def load(self, saved: dict) -> None: ...
    def params(self) -> Params: ...


class _AutogradStepper:
    """Any batchable model: vmapped loss, autograd, and torch's fused SGD / Adam update."""

    kind = "autograd"

    def __init__(self, task: Task, base: nn.Module, params: Params, x: torch.Tensor,
                 y: torch.Tensor, recipe: TrainRecipe, probe: torch.Tensor) -> None:
        self.x, self.y, self.wd = x, y, recipe.weight_decay
        self.clip = recipe.grad_clip

        def data_loss(p: Params, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            # train_model's objective without its L2 term, whose gradient wd * theta is added
            # outside autograd (see below): one pass over the stacked parameters instead of
            # an autograd graph of squares, sums and their backward over all M models.
            return objective(task, base, p, xb, yb, 0.0)

        self.losses_fn = vmap(data_loss)
        # Keep each stacked parameter in the layout its gradient comes back in (a linear
        # layer's weight gradient is the transpose of a batched matmul's output), so the
        # gradient needs no strided copy; the model sees the parameter through a view in its
        # own layout.
        self.flipped = _transposed_gradients(self.losses_fn, params, x[probe], y[probe])
        self.stored = {k: v.detach().transpose(-1, -2).contiguous().requires_grad_(True)
                       if k in self.flipped else v for k, v in params.items()}
        self.leaves = list(self.stored.values())
        self.opt = make_optimizer(recipe, self.leaves, fused=True)
        # The L2 term's gradient wd * theta: added by the fused update itself (SGD's and
        # Adam's weight_decay is exactly that), or before per-model clipping when the recipe
        # clips, since train_model clips the gradient of the whole objective.
        for group in self.opt.param_groups:
            group["weight_decay"] = 0.0 if self.clip is not None else self.wd

    def params(self) -> Params:
        """The stacked parameters in the model's own layout (views)."""
        return {k: v.transpose(-1, -2) if k in self.flipped else v
                for k, v in self.stored.items()}

    def step(self, idx: torch.Tensor, lr: float) -> torch.Tensor:
        """One step of every model on its rows ``idx``; the objectives before it."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        wd, clip = self.wd, self.clip is not None
        losses = self.losses_fn(self.params(), self.x[idx], self.y[idx])
        grads = torch.autograd.grad(losses.sum(), self.leaves)
        with torch.no_grad():
            losses = losses.detach()
            if wd:
                losses = losses + 0.5 * wd * _squared_norms(self.leaves)
            for leaf, grad in zip(self.leaves, grads, strict=True):
                if grad.stride() != leaf.stride():  # e.g. expanded: not writable in place
                    grad = torch.empty_like(leaf).copy_(grad)
                leaf.grad = grad.add_(leaf, alpha=wd) if wd and clip else grad
        if clip:
            _clip_per_model(self.leaves, self.clip)
        self.opt.step()
        return losses

    def state(self) -> dict:
        """The stored parameters and the optimizer's state."""
        return {"stored": {k: v.detach() for k, v in self.stored.items()},
                "optimizer": self.opt.state_dict()}

    def load(self, saved: dict) -> None:
        """Continue from a :meth:`state` saved by a run of the same models."""
        with torch.no_grad():
            for k, v in self.stored.items():
                v.copy_(saved["stored"][k])
        self.opt.load_state_dict(saved["optimizer"])


def _train_minibatch(task: Task, base: nn.Module, params: Params, train: ArrayDataset,
                     masks: torch.Tensor, recipe: TrainRecipe, seeds: Sequence[int],
                     device: torch.device, show_progress: bool, model: nn.Module,
                     state: _ChunkState | None = None) -> BatchedResult:
    index = subset_indices(masks)
    num_models, size = index.shape
    x, y = train.inputs.to(device), train.targets.to(device)
    chain = chain_for(task, recipe, model, x, y)
    stepper: _Stepper = (
        ChainStepper(chain, params, x, y, recipe) if chain is not None
        else _AutogradStepper(task, base, params, x, y, recipe,
                              index[:, : recipe.batch_size].to(device)))
    steps_per_epoch = max(1, math.ceil(size / recipe.batch_size))
    total = recipe.epochs * steps_per_epoch
    objectives = torch.zeros(num_models, dtype=torch.float64)
    first_epoch = 0
    saved = state.load(device, stepper.kind) if state is not None else None
    if saved is not None:
        stepper.load(saved["state"])
        objectives, first_epoch = saved["objectives"], int(saved["epoch"]) + 1
    if state is not None:
        state.last_save = time.perf_counter()
    bar = progress(range(first_epoch, recipe.epochs), enabled=show_progress,
                   desc=f"batched train {task.name} x{num_models}")
    for epoch in bar:
        order = torch.stack([index[m, epoch_permutation(size, int(seeds[m]), epoch)]
                             for m in range(num_models)]).to(device)
        running = torch.zeros(num_models, dtype=torch.float64, device=device)
        for i, start in enumerate(range(0, size, recipe.batch_size)):
            idx = order[:, start : start + recipe.batch_size]
            losses = stepper.step(idx, recipe.lr_at(epoch * steps_per_epoch + i, total))
            running += losses.double() * idx.shape[1]
        objectives = (running / size).cpu()
        _check_finite(task, objectives, epoch, recipe)
        if state is not None and epoch + 1 < recipe.epochs:
            state.maybe_save(epoch, stepper, objectives)
    return BatchedResult(params={k: v.detach().contiguous() for k, v in stepper.params().items()},
                         objectives=objectives)


def _transposed_gradients(losses_fn: Callable[..., torch.Tensor], params: Params, xb: torch.Tensor,
                          yb: torch.Tensor) -> set[str]:
    """Names of stacked parameters whose gradient autograd returns as a transposed view
    (last two dimensions swapped), found on one probe batch."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(losses_fn(leaves, xb, yb).sum(), list(leaves.values()))
    return {k for k, g in zip(leaves, grads, strict=True)
            if g.dim() >= 3 and not g.is_contiguous() and g.transpose(-1, -2).is_contiguous()}


def _squared_norms(leaves: list[torch.Tensor]) -> torch.Tensor:
    """``[M]`` squared norms of each model's slice of the stacked parameters."""
    return sum(torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1) ** 2 for v in leaves)


def _clip_per_model(leaves: list[torch.Tensor], max_norm: float) -> None:
    """clip_grad_norm_ applied to each model's slice of the stacked gradients."""
    grads = [p.grad for p in leaves if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in grads]).norm(dim=0)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.reshape(-1, *([1] * (g.dim() - 1))))


def _check_finite(task: Task, objectives: torch.Tensor, epoch: int, recipe: TrainRecipe) -> None:
    bad = ~torch.isfinite(objectives)
    if bool(bad.any()):
        which = bad.nonzero()[:, 0].tolist()
        raise FloatingPointError(
            f"batched training of {task.name} diverged at epoch {epoch} for model(s) "
            f"{which[:10]} (loss {objectives[which[0]].item()}); lower the learning rate (now "
            f"{recipe.lr}) or raise weight decay"
        )


def _flat_linear_names(model: nn.Module, x: torch.Tensor) -> tuple[str, str | None] | None:
    """(weight, bias) parameter names when ``model(x)`` is one nn.Linear of the flattened
    input (checked on a probe batch), else None."""
    linears = [(name, m) for name, m in model.named_modules() if any(True for _ in
               m.parameters(recurse=False))]
    if len(linears) != 1 or not isinstance(linears[0][1], nn.Linear):
        return None
    prefix, layer = linears[0]
    if layer.in_features != x[0].numel():
        return None
    w_name = f"{prefix}.weight" if prefix else "weight"
    b_name = (f"{prefix}.bias" if prefix else "bias") if layer.bias is not None else None
    probe_model = copy.deepcopy(model).to("cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in probe_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        probe = x[:4].detach().to("cpu", torch.float32)
        expected = probe.reshape(probe.shape[0], -1) @ probe_model.get_parameter(w_name).T
        if b_name is not None:
            expected = expected + probe_model.get_parameter(b_name)
        got = probe_model(probe)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        return None
    return w_name, b_name


def _train_lbfgs(task: Task, base: nn.Module, params: Params, train: ArrayDataset,
                 masks: torch.Tensor, recipe: TrainRecipe, device: torch.device,
                 show_progress: bool, base_model: nn.Module) -> BatchedResult:
    names = list(params)
    shapes = [params[k].shape[1:] for k in names]
    numels = [int(math.prod(s)) for s in shapes]
    num_models = masks.shape[0]
    theta0 = torch.cat([params[k].detach().reshape(num_models, -1) for k in names], dim=1)
    x, y = train.inputs.to(device), train.targets.to(device)
    weights = masks.to(device=device, dtype=theta0.dtype)
    weights = weights / weights.sum(1, keepdim=True)
    wd = recipe.weight_decay

    def unflatten(theta: torch.Tensor) -> Params:
        parts = torch.split(theta, numels, dim=-1)
        return {k: part.reshape(*theta.shape[:-1], *shape)
                for k, part, shape in zip(names, parts, shapes, strict=True)}

    def objective(theta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = functional_call(base, unflatten(theta), (x,))
        return (task.loss_fn(logits, y) * w).sum() + 0.5 * wd * (theta * theta).sum()

    linear = _flat_linear_names(base_model, x)
    if linear is not None:
        # Logistic regression: one GEMM of the shared inputs against all M weight matrices
        # (and one for the weight gradient) instead of M skinny ones.
        w_name, b_name = linear
        x_t = x.reshape(x.shape[0], -1).T.contiguous()
        plain_ce = task.loss_fn is cross_entropy

        def values(theta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            p = unflatten(theta)
            k, c = theta.shape[0], p[w_name].shape[1]
            logits = (p[w_name].reshape(k * c, -1) @ x_t).reshape(k, c, -1)  # [k, C, n]
            if b_name is not None:
                logits = logits + p[b_name][:, :, None]
            if plain_ce:
                # Class axis in the middle: log-softmax vectorises over examples (several
                # times faster on CPU than over a last axis of C classes).
                losses = F.cross_entropy(logits, y.expand(k, -1), reduction="none")
            else:
                flat = logits.transpose(1, 2).reshape(-1, c)
                losses = task.loss_fn(flat, y.repeat(k)).reshape(k, -1)
            return (losses * w).sum(1) + 0.5 * wd * (theta * theta).sum(1)
    else:
        values = vmap(objective)

    def evaluate(theta: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The M objectives have disjoint parameters, so the gradient of their sum is each
        # model's own gradient; plain autograd is cheaper here than a grad transform.
        with torch.enable_grad():
            theta = theta.detach().requires_grad_(True)
            f = values(theta, weights[rows])
            (g,) = torch.autograd.grad(f.sum(), theta)
        return f.detach(), g

    theta, f, iters, converged = batched_lbfgs(evaluate, theta0,
                                               recipe.epochs * recipe.lbfgs_iters,
                                    show_progress=show_progress, desc=f"batched L-BFGS {task.name}")
    objectives = f.double().cpu()
    _check_finite(task, objectives, recipe.epochs - 1, recipe)
    return BatchedResult(params=unflatten(theta), objectives=objectives, iterations=iters.cpu(),
                         converged=converged.cpu())


def batched_lbfgs(
    evaluate, theta0: torch.Tensor, max_iter: int, *, history: int = LBFGS_HISTORY,
    tol_grad: float = LBFGS_TOL_GRAD, tol_change: float = LBFGS_TOL_CHANGE,
    show_progress: bool = False, desc: str = "batched L-BFGS",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise M independent objectives at once; returns theta [M, p], f [M], iterations [M]
    and whether each model converged [M] (False: it ran out of ``max_iter``).

    ``evaluate(theta_rows [k, p], rows [k])`` returns the values [k] and gradients [k, p] of
    the objectives of models ``rows`` at ``theta_rows``. Each model keeps its own curvature
    pairs and step size (backtracking to the Armijo condition), and stops when its gradient's
    max-norm falls below ``tol_grad``, its objective or step changes by less than
    ``tol_change``, or no step along its direction decreases the objective any more.
    """
    theta = theta0.detach().clone()
    num_models, p = theta.shape
    every = torch.arange(num_models, device=theta.device)
    f, g = (t.detach() for t in evaluate(theta, every))
    s_hist = torch.zeros(num_models, history, p, dtype=theta.dtype, device=theta.device)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(num_models, history, dtype=theta.dtype, device=theta.device)
    gamma = torch.ones(num_models, dtype=theta.dtype, device=theta.device)
    has_pair = torch.zeros(num_models, dtype=torch.bool, device=theta.device)
    active = g.abs().amax(1) > tol_grad
    iters = torch.zeros(num_models, dtype=torch.long, device=theta.device)
    eps = torch.finfo(theta.dtype).eps
    slot, stored = 0, 0  # next ring slot; slots written so far (unwritten ones are skipped)
    bar = progress(range(max_iter), enabled=show_progress, desc=desc)
    for _ in bar:
        if not bool(active.any()):
            break
        # Two-loop recursion over the ring of pairs, newest first (invalid pairs have rho 0).
        q = -g
        order = [(slot - 1 - j) % history for j in range(history)]
        alphas = []
        for j in order[:stored]:
            a = rho[:, j] * torch.linalg.vecdot(s_hist[:, j], q)
            q.addcmul_(a[:, None], y_hist[:, j], value=-1)
            alphas.append(a)
        r = q.mul_(gamma[:, None])
        for j, a in zip(reversed(order[:stored]), reversed(alphas), strict=True):
            b = rho[:, j] * torch.linalg.vecdot(y_hist[:, j], r)
            r.addcmul_((a - b)[:, None], s_hist[:, j])
        direction = r
        gd = (g * direction).sum(1)
        bad = gd > -1e-30
        direction[bad] = -g[bad]
        gd[bad] = -(g[bad] * g[bad]).sum(1)
        step = torch.where(has_pair & ~bad, torch.ones_like(gamma),
                           (1.0 / g.abs().sum(1).clamp_min(1e-30)).clamp(max=1.0))
        # A model whose first-order predicted decrease is below the float resolution of its
        # objective cannot show a decrease any more: it has converged (no evaluation spent).
        resolvable = -step * gd > eps * f.abs()
        active &= resolvable
        # Per-model Armijo backtracking; only the models still searching are evaluated.
        pending = active.clone()
        new_theta, new_f, new_g = theta.clone(), f.clone(), g.clone()
        for _ in range(LBFGS_MAX_BACKTRACK):
            rows = pending.nonzero()[:, 0]
            if rows.numel() == 0:
                break
            trial = theta[rows] + step[rows, None] * direction[rows]
            f_try, g_try = (t.detach() for t in evaluate(trial, rows))
            # Armijo, and a strict decrease: where c1 * step * gd is below the float resolution
            # of f, Armijo alone would accept a step that leaves f unchanged.
            ok = (torch.isfinite(f_try) & (f_try < f[rows])
                  & (f_try <= f[rows] + LBFGS_C1 * step[rows] * gd[rows]))
            accepted = rows[ok]
            new_theta[accepted], new_f[accepted], new_g[accepted] = trial[ok], f_try[ok], g_try[ok]
            pending[accepted] = False
            step[pending] *= 0.5
        moved = active & ~pending
        active &= ~pending  # no strict decrease found: converged to floating-point precision
        s_new = new_theta - theta
        y_new = new_g - g
        ys = (s_new * y_new).sum(1)
        valid = moved & (ys > 1e-10)
        s_hist[:, slot] = torch.where(valid[:, None], s_new, 0)
        y_hist[:, slot] = torch.where(valid[:, None], y_new, 0)
        rho[:, slot] = torch.where(valid, 1.0 / ys.where(valid, torch.ones_like(ys)), 0)
        gamma = torch.where(valid, ys / (y_new * y_new).sum(1).clamp_min(1e-30), gamma)
        has_pair |= valid
        slot = (slot + 1) % history
        stored = min(stored + 1, history)
        change = (f - new_f).abs()
        step_size = s_new.abs().amax(1)
        theta, f, g = new_theta, new_f, new_g
        iters += moved.long()
        active &= (g.abs().amax(1) > tol_grad) & (change >= tol_change) & (step_size > tol_change)
        if show_progress:
            bar.set_postfix(active=int(active.sum()))
    return theta, f, iters, ~active


def batched_outputs(task: Task, base: nn.Module, params: Params, explained: ArrayDataset, *,
                    device: torch.device | str = "cpu", batch_size: int = 1024) -> torch.Tensor:
    """Outputs ``[M, m]`` of M stacked models on the explained examples."""
    device = torch.device(device)
    base.eval()

    def outputs(p: Params, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return task.output_fn(functional_call(base, p, (xb,)), yb)

    fn = vmap(outputs, in_dims=(0, None, None))
    chunks = []
    with torch.no_grad():
        for _, xb, yb in explained.batches(batch_size, device):
            chunks.append(fn(params, xb, yb))
    num_models = next(iter(params.values())).shape[0]
    return torch.cat(chunks, dim=1) if chunks else torch.empty(num_models, 0)


def retrain_outputs_batched(
    task: Task, recipe: TrainRecipe, train: ArrayDataset, explained: ArrayDataset,
    masks: torch.Tensor, seeds: Sequence[int], *, device: torch.device | str = "cpu",
    show_progress: bool = False, state_path: str | Path | None = None,
) -> np.ndarray:
    """Train one model per (mask, seed) at once; return their outputs on ``explained`` [M, m]
    (``state_path``: in-flight state saved about once a minute, see :func:`train_batched`).

    With an L-BFGS recipe, a model whose iteration budget ran out before it converged is
    retrained alone with ``train_model``: its result is then defined by the budget, not by
    the minimiser, and only the one-at-a-time run reproduces it.
    """
    result = train_batched(task, train, masks, recipe, seeds, device=device,
                           show_progress=show_progress, state_path=state_path)
    if result.converged is not None:
        for m in (~result.converged).nonzero()[:, 0].tolist():
            state = train_model(task, train.subset(masks[m].cpu()), recipe, int(seeds[m]),
                                device=device).state
            with torch.no_grad():
                for k, v in result.params.items():
                    v[m] = state[k].to(v.device, v.dtype)
    base = task.make_model().to("meta")
    out = batched_outputs(task, base, result.params, explained, device=device)
    return out.double().cpu().numpy()


def activation_numel(task: Task, example: torch.Tensor) -> int:
    """Scalars produced by all modules of the model for one example (a memory estimate)."""
    model = task.make_model()
    total = 0

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(example.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return total


def models_per_chunk(task: Task, recipe: TrainRecipe, train: ArrayDataset, *,
                     device: torch.device | str = "cpu", memory_bytes: int | None = None,
                     subset_size: int | None = None, cache_bytes: int | None = None) -> int:
    """How many models fit in one batched chunk within ``memory_bytes`` (default: 2 GiB on
    CPU, 60% of the free memory on a GPU), estimated from parameters, optimizer state and the
    activations of the rows each model processes per step.

    On a CPU, a model trained by the written-out chain path
    (:mod:`tdatune.models.linear_chain`) takes no more models than fill half the last-level
    cache (``cache_bytes``, default: read from the system), where they stay between steps."""
    device = torch.device(device)
    if memory_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory_bytes = int(0.6 * free)
        else:
            memory_bytes = DEFAULT_CPU_BUDGET
    model = task.make_model()
    p = sum(q.numel() for q in model.parameters())
    itemsize = next(model.parameters()).element_size()
    if recipe.optimizer == "lbfgs":
        rows = len(train)
        param_copies = 8 + 2 * LBFGS_HISTORY  # theta, grads, trial points, history pairs
    else:
        rows = min(recipe.batch_size, subset_size or len(train))
        param_copies = 5  # parameters, gradients, optimizer state
    acts = activation_numel(task, train.inputs[0]) + train.inputs[0].numel()
    per_model = itemsize * (p * param_copies + 3 * rows * acts)
    fit = max(1, int(memory_bytes // max(per_model, 1)))
    if device.type != "cpu":
        return fit
    chain = chain_for(task, recipe, model, train.inputs[:1], train.targets[:1])
    cache = last_level_cache_bytes() if cache_bytes is None else cache_bytes
    if chain is None or cache is None:
        return fit
    return min(fit, chain_models_in_cache(chain, rows, itemsize, cache))


class ChunkPlanner:
    """Consecutive chunks of ``items`` for batched training that bound what a kill loses.

    The models of a chunk finish together, so a kill loses the chunk in flight. ``fit`` is the
    most models memory allows. The first chunk has ``min(fit, first)`` models (ten: what a
    kill may lose before anything is measured); after each chunk, its seconds per model ``p``
    size the next one to about ``max_seconds`` of work (a minute), ``floor(max_seconds / p)``
    models, never more than ``fit`` nor fewer than one. ``p`` includes the chunk's fixed
    per-step cost, so it overestimates larger chunks' cost per model: chunks grow towards the
    bound from below and stay under it. Iterate over :meth:`chunks`; each chunk is timed from
    when it is handed out until the next is asked for (the caller trains and stores it in
    between).
    """

    def __init__(self, fit: int, *, first: int = FIRST_CHUNK_MODELS,
                 max_seconds: float = MAX_CHUNK_SECONDS,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if fit < 1 or first < 1 or not max_seconds > 0:
            raise ValueError(f"chunk sizes must be >= 1 and the time bound > 0, got fit={fit}, "
                             f"first={first}, max_seconds={max_seconds}")
        self.fit, self.max_seconds, self.clock = int(fit), float(max_seconds), clock
        self.size = min(self.fit, int(first))
        self.sizes: list[int] = []

    def update(self, models: int, seconds: float) -> int:
        """Size the next chunk after one of ``models`` models took ``seconds``; return it."""
        per_model = max(seconds, 1e-9) / max(models, 1)
        self.size = max(1, min(self.fit, math.floor(self.max_seconds / per_model)))
        return self.size

    def chunks(self, items: Sequence[object]) -> Iterator[list]:
        """Yield consecutive chunks of ``items`` sized as described above."""
        start = 0
        while start < len(items):
            chunk = list(items[start : start + self.size])
            self.sizes.append(len(chunk))
            began = self.clock()
            yield chunk
            self.update(len(chunk), self.clock() - began)
            start += len(chunk)


class ChunkCheckpoints:
    """Chunks of retraining jobs whose in-flight training state is kept in ``directory``.

    Before a chunk is trained its job keys go to ``.batched_chunk.json``; while it trains,
    :func:`train_batched` saves its state to ``.batched_chunk.pt`` (:attr:`state_path`) about
    once a minute; once the caller has stored the chunk's models (when it asks for the next
    chunk) both files are removed. A rerun first finishes a chunk found in flight, with the
    same jobs (so it resumes from the saved state, bitwise as if uninterrupted), then the rest
    of the jobs in chunks of ``size``.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.jobs_path = self.directory / ".batched_chunk.json"
        self.state_path = self.directory / ".batched_chunk.pt"

    def clear(self) -> None:
        """Remove the in-flight chunk's files."""
        for path in (self.state_path, self.jobs_path):  # the state first: never a state
            remove_with_record(path)                    # without its chunk's job list

    def _in_flight(self, jobs: Sequence[object], key: Callable[[object], list]) -> list:
        """The jobs of the chunk found in flight, when all of them are still to do."""
        if not is_intact(self.jobs_path):
            return []
        by_key = {json.dumps(key(j)): j for j in jobs}
        saved = [json.dumps(k) for k in read_json(self.jobs_path).get("jobs", [])]
        if saved and all(k in by_key for k in saved):
            return [by_key[k] for k in saved]
        return []

    def chunks(self, jobs: Sequence[object], size: int,
               key: Callable[[object], list]) -> Iterator[list]:
        """Yield the chunk in flight (if any), then the other ``jobs`` in chunks of ``size``;
        ``key(job)`` is a JSON-able identity of a job."""
        first = self._in_flight(jobs, key)
        if not first:
            self.clear()
        taken = {id(j) for j in first}
        rest = [j for j in jobs if id(j) not in taken]
        pieces = ([first] if first else []) + [list(rest[i : i + size])
                                              for i in range(0, len(rest), max(size, 1))]
        for chunk in pieces:
            if chunk is not first:
                atomic_write_json(self.jobs_path, {"jobs": [key(j) for j in chunk]})
            yield chunk
            self.clear()


__all__ = [
    "BatchedResult", "BatchedTrainingUnsupported", "ChunkCheckpoints", "ChunkPlanner",
    "activation_numel", "batched_lbfgs", "batched_outputs", "check_batchable",
    "models_per_chunk", "retrain_outputs_batched", "subset_indices", "supports_batched",
    "train_batched",
]
