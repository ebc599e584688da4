"""Deterministic training from a seed, with a checkpoint per epoch.

The training objective is always ``mean per-example loss + weight_decay / 2 * ||theta||^2``
(L2 in the loss, for every optimizer), so that the curvature attributors see exactly the
objective that was minimised. Logistic regression uses full-batch L-BFGS (an "epoch" is one
L-BFGS call of ``lbfgs_iters`` iterations); other models use minibatch SGD or Adam whose
batch order comes from ``epoch_permutation(seed, epoch)`` so that batched retraining can
reproduce it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdatune.data.base import ArrayDataset
from tdatune.data.batches import Tree, batch_len, tree_index
from tdatune.models.checkpoints import check_state, state_of
from tdatune.models.identity import refuse_older_format, task_identity
from tdatune.models.task import Params, Task, callable_name, check_task, model_params, model_state
from tdatune.utils.atomic import atomic_torch_save, atomic_write_json, read_json, torch_load_verified
from tdatune.utils.checks import check_choice
from tdatune.utils.fingerprint import content_fingerprint, describe_content, differences, fingerprint_config
from tdatune.utils.progress import progress

OPTIMIZERS = ("lbfgs", "sgd", "adam")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class TrainRecipe:
    """How a model is trained; recorded with every run and part of every fingerprint."""

    optimizer: str = "sgd"
    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    lbfgs_iters: int = 100
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0 or self.batch_size < 1 or self.weight_decay < 0:
            raise ValueError(
                f"need lr > 0, batch_size >= 1, weight_decay >= 0; got lr={self.lr}, "
                f"batch_size={self.batch_size}, weight_decay={self.weight_decay}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for manifests."""
        return asdict(self)

    def epoch_learning_rates(self, n_train: int) -> list[float]:
        """The learning rate in force at the start of each epoch (TracIn's weights); 1 for
        L-BFGS."""
        if self.optimizer == "lbfgs":
            return [1.0] * self.epochs
        steps = max(1, -(-n_train // self.batch_size))
        return [self.lr_at(e * steps, self.epochs * steps) for e in range(self.epochs)]

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate at ``step`` of ``total_steps`` under the schedule."""
        frac = step / max(total_steps, 1)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * frac))
        if self.schedule == "linear":
            return self.lr * (1 - frac)
        return self.lr


@dataclass
class TrainResult:
    """Final state (parameters + buffers), one state per epoch, and per-epoch history."""

    state: Params
    checkpoints: list[Params]
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class TrainFunction:
    """Your own training loop, used wherever a :class:`TrainRecipe` is (training, ground truth
    on every backend, settings, sweeps).

    ``fn(data, seed, **options)`` trains a fresh model on ``data`` (an :class:`ArrayDataset`,
    also a map-style Dataset for a DataLoader) and returns the trained state: a module, a state
    dict, a list of per-epoch ones (last = final; they become the checkpoints) or a
    :class:`TrainResult`. With ``pass_indices=True`` it gets ``indices`` (a long tensor of
    positions in the training set you gave) instead of ``data``. The torch, numpy and random
    seeds are set to ``seed`` just before the call. For the process and Ray backends ``fn``
    must pickle: a module-level function (or a functools.partial of one), not a lambda.

    ``weight_decay`` is the L2 coefficient of your objective (for the curvature attributors;
    put only ``wd / 2 * ||theta||^2`` in your loss or optimizer's ``weight_decay`` for SGD),
    ``learning_rates`` one per returned checkpoint for TracIn. ``name`` identifies the function
    in manifests (default: ``module:qualname`` and its content, so a function whose source,
    defaults, closure or partial arguments changed is another function); give it to vouch for
    the function yourself (e.g. a version string), and results of another name are refused.
    """

    fn: Callable[..., Any]
    weight_decay: float = 0.0
    learning_rates: tuple[float, ...] | None = None
    pass_indices: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    optimizer = "user"  # not a field: what backends and reports read to tell recipes apart

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"TrainFunction needs a callable (data, seed) -> trained state, got "
                            f"{type(self.fn).__name__}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.learning_rates is not None:
            object.__setattr__(self, "learning_rates", tuple(float(v) for v in self.learning_rates))

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for manifests: the function by name and, unless ``name`` vouches for
        it, by content (source, defaults, closure, a partial's arguments), and every option by
        content."""
        return {"train_function": self.name or callable_name(self.fn),
                "content": None if self.name else content_fingerprint(self.fn),
                "weight_decay": self.weight_decay, "learning_rates": self.learning_rates,
                "pass_indices": self.pass_indices, "options": describe_content(self.options)}

    def epoch_learning_rates(self, n_train: int) -> list[float] | None:
        """The learning rates given for TracIn (None: every checkpoint weighs 1)."""
        return None if self.learning_rates is None else list(self.learning_rates)

    def run(self, task: Task, data: ArrayDataset, seed: int,
            index: torch.Tensor | None = None) -> TrainResult:
        """Call the function on ``data`` (or its rows ``index``) and check what it returns."""
        import random

        import numpy as np

        subset = data if index is None else data.subset(index)
        torch.manual_seed(int(seed))
        np.random.seed(int(seed) % 2**32)  # noqa: NPY002 (seeds the user's legacy np.random calls)
        random.seed(int(seed))
        if self.pass_indices:
            positions = (torch.arange(len(data)) if index is None else
                         torch.as_tensor(index).nonzero()[:, 0]
                         if torch.as_tensor(index).dtype == torch.bool else torch.as_tensor(index))
            out = self.fn(positions, int(seed), **self.options)
        else:
            out = self.fn(subset, int(seed), **self.options)
        where = f"the state returned by training function {self.name or callable_name(self.fn)}"
        if isinstance(out, TrainResult):
            states = out.checkpoints or [out.state]
        elif isinstance(out, (list, tuple)):
            states = [state_of(o, where) for o in out]
        else:
            states = [state_of(out, where)]
        if not states:
            raise ValueError(f"{where} is an empty list; return the trained model's state dict")
        states = [{k: v.detach().cpu().clone() for k, v in st.items()} for st in states]
        with torch.random.fork_rng(devices=[]):
            model = task.make_model()
        for i, st in enumerate(states):
            check_state(task, st, model, where=f"{where} (checkpoint {i})")
        if self.learning_rates is not None and len(self.learning_rates) != len(states):
            raise ValueError(f"{where}: {len(states)} checkpoint(s) but {len(self.learning_rates)}"
                             " learning_rates; give one learning rate per returned checkpoint")
        history = out.history if isinstance(out, TrainResult) else [
            {"epoch": i} for i in range(len(states))]
        return TrainResult(state=states[-1], checkpoints=states, history=history)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The minibatch order of one epoch: a permutation of range(n) fixed by (seed, epoch)."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=gen)


def init_model(task: Task, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """Build the task's model with initialisation fixed by ``seed``."""
    torch.manual_seed(int(seed))
    if torch.device(device).type == "cuda":
        pin_cuda_determinism()
    return task.make_model().to(device)


def load_model(task: Task, state: Params,
               device: torch.device | str = "cpu") -> tuple[nn.Module, Params]:
    """A model holding ``state`` (parameters + buffers), in eval mode, and its trainable
    parameters. The global RNG is left as it was: loading is not initialising."""
    with torch.random.fork_rng(devices=[]):
        model = init_model(task, 0, device)
    check_state(task, state, model)
    state = {k: v.to(device) for k, v in state.items()}
    model.load_state_dict(state)
    model.eval()
    return model, trainable(model, state)


def pin_cuda_determinism() -> None:
    """Deterministic cuDNN kernels (no autotuning), so a seed gives the same run on a GPU in
    every process that trains: ``tdatune train``, ground-truth workers, batched retraining."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def l2_penalty(params: Params, weight_decay: float) -> torch.Tensor | float:
    """(weight_decay / 2) * ||theta||^2 over trainable parameters."""
    if weight_decay == 0:
        return 0.0
    return 0.5 * weight_decay * sum((p * p).sum() for p in params.values())


def objective(task: Task, model: nn.Module, params: Params, inputs: Tree,
              targets: Tree, weight_decay: float) -> torch.Tensor:
    """Mean per-example loss plus the L2 term: the function training minimises."""
    outputs = task.call(model, params, inputs)
    return task.loss_fn(outputs, targets).mean() + l2_penalty(params, weight_decay)


def train_model(
    task: Task,
    data: ArrayDataset,
    recipe: TrainRecipe | TrainFunction,
    seed: int = 0,
    *,
    device: torch.device | str = "cpu",
    checkpoint_dir: str | Path | None = None,
    show_progress: bool = False,
    on_epoch: Callable[[int, Params], dict[str, float]] | None = None,
    check: bool = True,
) -> TrainResult:
    """Train ``task``'s model on ``data`` deterministically; keep (and optionally save) every epoch.

    With ``checkpoint_dir`` set, each epoch's state is written atomically as
    ``epoch_XXX.pt`` next to ``recipe.json``; a rerun with the same recipe and seed resumes
    after the last saved epoch instead of starting over. A :class:`TrainFunction` recipe runs
    your own loop instead (its checkpoints are saved the same way; a rerun reuses them).
    ``check`` first runs :func:`~tdatune.models.task.check_task` on a few examples (a batch the
    model cannot take, a loss that is not per example), so bad input stops before training.
    """
    if check:
        check_task(task, data, what="training data")
    if isinstance(recipe, TrainFunction):
        return _train_with_function(task, data, recipe, seed, checkpoint_dir, on_epoch)
    model = init_model(task, seed, device)
    on_device = data.to(device)
    x, y = on_device.inputs, on_device.targets
    params = {k: p for k, p in model.named_parameters()}
    opt = make_optimizer(recipe, list(params.values()))
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    checkpoints: list[Params] = []
    history: list[dict[str, float]] = []
    start_epoch = 0
    if ckpt_dir is not None:
        _claim(ckpt_dir, task, data, recipe, seed)
        start_epoch = _resume(ckpt_dir, model, opt, checkpoints, history)
        if start_epoch < recipe.epochs:
            _record_environment(ckpt_dir, start_epoch, device)
    n = len(data)
    steps_per_epoch = max(1, math.ceil(n / recipe.batch_size))
    total = recipe.epochs * steps_per_epoch
    # One bar tick per optimizer step (per L-BFGS call for full-batch recipes), so long epochs
    # show progress too.
    per_epoch = 1 if recipe.optimizer == "lbfgs" else steps_per_epoch
    bar = progress(total=(recipe.epochs - start_epoch) * per_epoch, enabled=show_progress,
                   desc=f"train {task.name}", unit="step")
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        if show_progress:
            bar.set_description(f"train {task.name} epoch {epoch + 1}/{recipe.epochs}")
        if recipe.optimizer == "lbfgs":
            loss = _lbfgs_epoch(task, model, params, opt, x, y, recipe)
            bar.update(1)
        else:
            loss = _minibatch_epoch(task, model, params, opt, x, y, recipe, seed, epoch,
                                    epoch * steps_per_epoch, total, on_step=bar.update)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training {task.name} diverged at epoch {epoch} (loss {loss}); lower the learning "
                f"rate (now {recipe.lr}) or raise weight decay"
            )
        state = model_state(model)
        record = {"epoch": epoch, "train_objective": loss}
        if on_epoch is not None:
            record.update(on_epoch(epoch, state))
        checkpoints.append(state)
        history.append(record)
        if show_progress:
            bar.set_postfix(loss=f"{loss:.4f}")
        if ckpt_dir is not None:
            atomic_torch_save(ckpt_dir / f"epoch_{epoch:03d}.pt",
                              {"state": state, "optimizer": opt.state_dict(), "record": record})
            atomic_write_json(ckpt_dir / "history.json", history)
    bar.close()
    return TrainResult(state=model_state(model), checkpoints=checkpoints, history=history)


def _train_with_function(task: Task, data: ArrayDataset, recipe: TrainFunction, seed: int,
                         checkpoint_dir: str | Path | None,
                         on_epoch: Callable[[int, Params], dict[str, float]] | None
                         ) -> TrainResult:
    """Run the user's training function (or reuse its saved result) and save its states."""
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        _claim(ckpt_dir, task, data, recipe, seed)
        checkpoints: list[Params] = []
        history: list[dict[str, float]] = []
        with torch.random.fork_rng(devices=[]):
            probe = task.make_model()
        opt = torch.optim.SGD(probe.parameters(), lr=1.0)  # _resume's signature; unused here
        saved = _resume(ckpt_dir, probe, opt, checkpoints, history)
        complete = ckpt_dir / "complete.json"
        # Reuse only a finished run whose every checkpoint is intact (a damaged one is dropped
        # by _resume, and the function then runs again: it cannot resume mid-way).
        if saved and complete.exists() and read_json(complete).get("checkpoints") == saved:
            return TrainResult(state=checkpoints[-1], checkpoints=checkpoints, history=history)
        _record_environment(ckpt_dir, 0, "cpu")
    result = recipe.run(task, data, seed)
    for epoch, state in enumerate(result.checkpoints):
        record: dict[str, float] = {"epoch": epoch, **{k: v for k, v in (
            result.history[epoch] if epoch < len(result.history) else {}).items()
            if k != "epoch"}}
        if on_epoch is not None:
            record.update(on_epoch(epoch, state))
        if epoch < len(result.history):
            result.history[epoch] = record
        if ckpt_dir is not None:
            atomic_torch_save(ckpt_dir / f"epoch_{epoch:03d}.pt",
                              {"state": state, "optimizer": None, "record": record})
    if ckpt_dir is not None:
        atomic_write_json(ckpt_dir / "history.json", result.history)
        atomic_write_json(ckpt_dir / "complete.json", {"checkpoints": len(result.checkpoints)})
    return result


def make_optimizer(recipe: TrainRecipe, params: list[torch.Tensor], *,
                   fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``params`` (shared with batched retraining).

    ``fused`` selects torch's single-kernel SGD / Adam update (the same arithmetic, one pass
    over the parameters; batched retraining uses it for its large stacked tensors).
    """
    if recipe.optimizer == "lbfgs":
        return torch.optim.LBFGS(params, lr=1.0, max_iter=recipe.lbfgs_iters, history_size=20,
                                 tolerance_grad=1e-10, tolerance_change=1e-14,
                                 line_search_fn="strong_wolfe")
    kind = {"fused": True} if fused else {}
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, **kind)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, **kind)


def _lbfgs_epoch(task: Task, model: nn.Module, params: Params, opt: torch.optim.Optimizer,
                 x: Tree, y: Tree, recipe: TrainRecipe) -> float:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(task, model, params, x, y, recipe.weight_decay)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(objective(task, model, params, x, y, recipe.weight_decay))


def _minibatch_epoch(task: Task, model: nn.Module, params: Params, opt: torch.optim.Optimizer,
                     x: Tree, y: Tree, recipe: TrainRecipe, seed: int,
                     epoch: int, step0: int, total: int,
                     on_step: Callable[[int], object] | None = None) -> float:
    n = batch_len(x, "inputs")
    order = epoch_permutation(n, seed, epoch)
    if isinstance(x, torch.Tensor):
        order = order.to(x.device)
    running, count = 0.0, 0
    for i, start in enumerate(range(0, n, recipe.batch_size)):
        for group in opt.param_groups:
            group["lr"] = recipe.lr_at(step0 + i, total)
        idx = order[start : start + recipe.batch_size]
        opt.zero_grad()
        xb = x[idx] if isinstance(x, torch.Tensor) else tree_index(x, idx)
        yb = (xb if y is x else y[idx] if isinstance(y, torch.Tensor) else tree_index(y, idx))
        loss = objective(task, model, params, xb, yb, recipe.weight_decay)
        loss.backward()
        if recipe.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), recipe.grad_clip)
        opt.step()
        running += float(loss.detach()) * idx.numel()
        count += idx.numel()
        if on_step is not None:
            on_step(1)
    return running / max(count, 1)


CHECKPOINT_FORMAT = 2  # 2: the record holds the task's identity and the data's fingerprint


def training_meta(task: Task, data: ArrayDataset, recipe: TrainRecipe | TrainFunction,
                  seed: int) -> dict[str, Any]:
    """What identifies a training run: recipe (or training function and options), seed, the
    task's every field with the model's architecture, and the training data's contents."""
    return {"format": CHECKPOINT_FORMAT, "recipe": recipe.to_dict(), "seed": seed,
            "task": task_identity(task), "n": len(data), "data": data.fingerprint()}


def check_checkpoint_dir(ckpt_dir: str | Path, task: Task, data: ArrayDataset,
                         recipe: TrainRecipe | TrainFunction, seed: int) -> None:
    """Refuse, naming the fields that differ, a checkpoint directory of another training run
    (before anything says it is reused); nothing happens when it holds no run yet."""
    _claim(Path(ckpt_dir), task, data, recipe, seed, write=False)


def _claim(ckpt_dir: Path, task: Task, data: ArrayDataset, recipe: TrainRecipe | TrainFunction,
           seed: int, write: bool = True) -> str:
    """Check ``recipe.json`` against this run (an older format is refused with the command to
    rebuild), write it for a new directory; return the run's fingerprint."""
    meta = training_meta(task, data, recipe, seed)
    fp = fingerprint_config(meta)
    meta_path = ckpt_dir / "recipe.json"
    if not meta_path.exists():
        if write:
            atomic_write_json(meta_path, {"fingerprint": fp, "meta": meta})
        return fp
    saved = read_json(meta_path)
    if saved.get("fingerprint") == fp:
        return fp
    stored = saved.get("meta") or {}
    refuse_older_format(stored, meta, ckpt_dir, "checkpoints", "retrain")
    diffs = differences(stored, meta)
    raise ValueError(
        f"{ckpt_dir} holds checkpoints of a different training run (differs in: "
        f"{', '.join(diffs) or 'fingerprint'}); use another directory or delete this one")


def _record_environment(ckpt_dir: Path, first_epoch: int, device: torch.device | str) -> None:
    """Append the numeric environment of the epochs trained from ``first_epoch`` on to
    ``environment.json`` (one entry per start that differs from the last one)."""
    from tdatune.utils.environment import numeric_environment

    path = ckpt_dir / "environment.json"
    entries = read_json(path) if path.exists() else []
    env = numeric_environment(device)
    if not entries or {k: v for k, v in entries[-1].items() if k != "from_epoch"} != env:
        entries.append({"from_epoch": first_epoch, **env})
        atomic_write_json(path, entries)


def _resume(ckpt_dir: Path, model: nn.Module, opt: torch.optim.Optimizer,
            checkpoints: list[Params], history: list[dict[str, float]]) -> int:
    """Load saved epochs of the run (checked first by :func:`_claim`) into ``checkpoints``;
    return the next epoch."""
    from tdatune.utils.atomic import truncate_damaged_epochs

    # Epochs from the first damaged checkpoint on are deleted (and said so) and retrained.
    files, blobs = truncate_damaged_epochs(sorted(ckpt_dir.glob("epoch_*.pt")))
    for blob in blobs:
        checkpoints.append(blob["state"])
        history.append(blob["record"])
    if files:
        last = torch_load_verified(files[-1], map_location=next(model.parameters()).device)
        model.load_state_dict(last["state"])
        if last["optimizer"] is not None:  # None: saved from a user's TrainFunction
            opt.load_state_dict(last["optimizer"])
    return len(files)


def load_checkpoints(ckpt_dir: str | Path) -> list[Params]:
    """All per-epoch states saved by ``train_model`` in ``ckpt_dir``, in epoch order."""
    files = sorted(Path(ckpt_dir).glob("epoch_*.pt"))
    if not files:
        raise FileNotFoundError(f"no epoch_XXX.pt checkpoints in {ckpt_dir}; train first")
    fix = ("rerun the training with the same checkpoint directory (train_model / `tdatune "
           "train`): it retrains from the last intact epoch")
    return [torch_load_verified(f, fix)["state"] for f in files]


def trainable(model: nn.Module, state: Params) -> Params:
    """The trainable-parameter part of a full state (parameters + buffers)."""
    names = {k for k, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


__all__ = [
    "TrainFunction", "TrainRecipe", "TrainResult", "check_checkpoint_dir", "epoch_permutation",
    "init_model", "l2_penalty",
    "load_checkpoints", "load_model", "make_optimizer", "model_params", "objective",
    "train_model", "trainable", "training_meta",
]
