"""Batched retraining against the independent computation: each model trained alone."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch
from torch import nn

from tdatune.evaluate.groundtruth import GroundTruthConfig, retrain_outputs, sample_subsets
from tdatune.models.batched import (
    BatchedTrainingUnsupported,
    batched_lbfgs,
    check_batchable,
    models_per_chunk,
    retrain_outputs_batched,
    subset_indices,
    supports_batched,
    train_batched,
)
from tdatune.models.small import MLP, LogisticRegression
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe, train_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lr_task(splits) -> Task:
    return Task(make_model=partial(LogisticRegression, 64, splits.num_classes), name="lr")


def _mlp_task(splits) -> Task:
    return Task(make_model=partial(MLP, 64, (16,), splits.num_classes), name="mlp")


def _newton_minimiser(x: torch.Tensor, y: torch.Tensor, classes: int, wd: float) -> torch.Tensor:
    """Exact minimiser of mean CE + wd/2 ||W, b||^2 by Newton's method in float64 ([C, d+1]),
    with the analytic softmax-regression gradient and Hessian."""
    x = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    n, dim = x.shape
    onehot = nn.functional.one_hot(y, classes).double()
    w = torch.zeros(classes, dim, dtype=torch.float64)
    for _ in range(50):
        prob = torch.softmax(x @ w.T, dim=1)
        g = (prob - onehot).T @ x / n + wd * w
        if float(g.abs().max()) < 1e-12:
            break
        a = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
        h = torch.einsum("iab,ij,ik->ajbk", a, x, x).reshape(classes * dim, -1) / n
        h += wd * torch.eye(classes * dim, dtype=torch.float64)
        w = w - torch.linalg.solve(h, g.reshape(-1)).reshape(classes, dim)
    return w


def test_batched_lbfgs_reaches_the_minimiser_train_model_reaches(digits_small):
    train = digits_small.train
    task = _lr_task(digits_small)
    recipe = TrainRecipe(optimizer="lbfgs", epochs=3, lbfgs_iters=100, weight_decay=1e-2)
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=2, alpha=0.5, subset_seed=3))
    seeds = [5, 6]
    result = train_batched(task, train, masks, recipe, seeds)
    for m, seed in enumerate(seeds):
        sub = train.subset(masks[m])
        exact = _newton_minimiser(sub.inputs, sub.targets, digits_small.num_classes, 1e-2)
        alone = train_model(task, sub, recipe, seed).state
        batched = result.state(m)
        for name, ref in (("linear.weight", exact[:, :-1]), ("linear.bias", exact[:, -1])):
            assert torch.allclose(batched[name].double(), ref, atol=2e-3), name
            assert torch.allclose(alone[name].double(), ref, atol=2e-3), name
            assert torch.allclose(batched[name], alone[name], atol=3e-3), name


# (training examples, weight decay, models, subset seed, allowed relative excess). Which model
# of which configuration a premature stop hits depends on rounding; each of these caught one
# (the first with the original line search, the second with Armijo lacking a strict decrease).
RESOLUTION_CASES = [(400, 1e-2, 16, 3, 1.5e-6), (1000, 1e-4, 24, 0, 4e-6)]


@pytest.mark.parametrize("n_train,wd,models,subset_seed,excess", RESOLUTION_CASES)
def test_batched_lbfgs_objectives_reach_float32_resolution_of_the_minimum(
        n_train, wd, models, subset_seed, excess):
    """Every model's objective ends within a few float32 ulps of the exact minimum: no model
    stops early on a step that left its float32 objective unchanged."""
    from tdatune.data.digits import load_digits_splits

    splits = load_digits_splits(n_train=n_train, n_val=30, n_test=40, seed=1)
    task = _lr_task(splits)
    recipe = TrainRecipe(optimizer="lbfgs", epochs=5, lbfgs_iters=100, weight_decay=wd)
    masks = sample_subsets(len(splits.train),
                           GroundTruthConfig(n_subsets=models, alpha=0.5, subset_seed=subset_seed))
    result = train_batched(task, splits.train, masks, recipe, list(range(models)))
    assert bool(result.converged.all())
    for m in range(models):
        sub = splits.train.subset(masks[m])
        w = _newton_minimiser(sub.inputs, sub.targets, splits.num_classes, wd)
        x = torch.cat([sub.inputs.double(), torch.ones(len(sub), 1, dtype=torch.float64)], 1)
        minimum = float(nn.functional.cross_entropy(x @ w.T, sub.targets)
                        + 0.5 * wd * (w * w).sum())
        assert minimum <= float(result.objectives[m]) + 1e-7
        assert float(result.objectives[m]) <= minimum * (1 + excess), m


def test_batched_sgd_momentum_equals_train_model(digits_small):
    train = digits_small.train
    task = _mlp_task(digits_small)
    recipe = TrainRecipe(optimizer="sgd", epochs=4, lr=0.05, batch_size=16, momentum=0.9,
                         weight_decay=1e-3, schedule="cosine")
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=3, alpha=0.6, subset_seed=1))
    seeds = [0, 11, 22]
    result = train_batched(task, train, masks, recipe, seeds)
    for m, seed in enumerate(seeds):
        alone = train_model(task, train.subset(masks[m]), recipe, seed)
        for name, value in alone.state.items():
            assert torch.allclose(result.state(m)[name], value, atol=1e-5, rtol=1e-4), name
        assert result.objectives[m] == pytest.approx(alone.history[-1]["train_objective"],
                                                     rel=1e-4)


def test_batched_adam_with_clipping_equals_train_model(digits_small):
    train = digits_small.train
    task = _mlp_task(digits_small)
    recipe = TrainRecipe(optimizer="adam", epochs=2, lr=0.01, batch_size=32, grad_clip=0.5,
                         weight_decay=1e-3)
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=2, alpha=0.5, subset_seed=2))
    result = train_batched(task, train, masks, recipe, [3, 4])
    for m, seed in enumerate([3, 4]):
        alone = train_model(task, train.subset(masks[m]), recipe, seed)
        for name, value in alone.state.items():
            assert torch.allclose(result.state(m)[name], value, atol=1e-5, rtol=1e-4), name


class _SummedShift(nn.Module):
    """A parameter that enters only through its sum: autograd hands back an expanded
    gradient (one element seen from many places), which must not be written in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.shift = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.shift.sum()


def test_batched_sgd_handles_expanded_gradients(digits_small):
    train = digits_small.train
    task = Task(make_model=_SummedShift, name="shift")
    recipe = TrainRecipe(optimizer="sgd", epochs=2, lr=0.05, batch_size=16, momentum=0.9,
                         weight_decay=1e-3)
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=2, alpha=0.5, subset_seed=1))
    result = train_batched(task, train, masks, recipe, [0, 1])
    for m in range(2):
        alone = train_model(task, train.subset(masks[m]), recipe, m)
        for name, value in alone.state.items():
            assert torch.allclose(result.state(m)[name], value, atol=1e-5, rtol=1e-4), name


def test_batched_outputs_equal_per_model_outputs(digits_small):
    train, explained = digits_small.train, digits_small.test
    task = _mlp_task(digits_small)
    recipe = TrainRecipe(optimizer="sgd", epochs=2, lr=0.05, batch_size=32)
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=3))
    out = retrain_outputs_batched(task, recipe, train, explained, masks, [1, 2, 3])
    assert out.shape == (3, len(explained))
    for m, seed in enumerate([1, 2, 3]):
        alone = retrain_outputs(task, recipe, train, explained, masks[m], seed)
        assert out[m] == pytest.approx(alone, abs=1e-4)


def test_unconverged_lbfgs_models_are_retrained_alone(digits_small):
    # A budget too small to converge: the result is the budget's, so it must match train_model.
    train, explained = digits_small.train, digits_small.test
    task = _lr_task(digits_small)
    recipe = TrainRecipe(optimizer="lbfgs", epochs=1, lbfgs_iters=5, weight_decay=1e-2)
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=2))
    result = train_batched(task, train, masks, recipe, [0, 1])
    assert result.converged is not None and not bool(result.converged.any())
    out = retrain_outputs_batched(task, recipe, train, explained, masks, [0, 1])
    for m in range(2):
        alone = retrain_outputs(task, recipe, train, explained, masks[m], m)
        assert out[m] == pytest.approx(alone, abs=1e-5)


def test_batched_lbfgs_solves_separable_quadratics():
    # Independent check of the optimiser: M quadratics with known minimisers A_m^-1 b_m.
    gen = torch.Generator().manual_seed(0)
    mats = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    mats = mats @ mats.transpose(1, 2) + 0.5 * torch.eye(6, dtype=torch.float64)
    rhs = torch.randn(4, 6, generator=gen, dtype=torch.float64)

    def evaluate(theta, rows):
        a, b = mats[rows], rhs[rows]
        ax = (a @ theta[..., None])[..., 0]
        return 0.5 * (theta * ax).sum(1) - (b * theta).sum(1), ax - b

    theta, _, iters, converged = batched_lbfgs(evaluate, torch.zeros(4, 6, dtype=torch.float64),
                                               200)
    expected = torch.linalg.solve(mats, rhs[..., None])[..., 0]
    assert torch.allclose(theta, expected, atol=1e-6)
    assert bool((iters > 0).all()) and bool(converged.all())


def test_batchnorm_and_dropout_are_refused():
    bn = Task(make_model=partial(nn.Sequential, nn.Linear(4, 4), nn.BatchNorm1d(4)), name="bn")
    drop = Task(make_model=partial(nn.Sequential, nn.Linear(4, 4), nn.Dropout(0.1)), name="dr")
    for task in (bn, drop):
        assert not supports_batched(task)
        with pytest.raises(BatchedTrainingUnsupported, match="sequential or process"):
            check_batchable(task)


def test_bad_subsets_are_refused(digits_small):
    masks = torch.zeros(2, len(digits_small.train), dtype=torch.bool)
    masks[0, :10] = True
    masks[1, :11] = True
    with pytest.raises(ValueError, match="one common size"):
        subset_indices(masks)
    task = _lr_task(digits_small)
    with pytest.raises(ValueError, match="one seed"):
        train_batched(task, digits_small.train, masks[:1], TrainRecipe(), [1, 2])


def test_models_per_chunk_respects_memory(digits_small):
    task = _mlp_task(digits_small)
    recipe = TrainRecipe(optimizer="sgd", batch_size=32)
    small = models_per_chunk(task, recipe, digits_small.train, memory_bytes=1 << 20)
    large = models_per_chunk(task, recipe, digits_small.train, memory_bytes=1 << 30)
    assert 1 <= small < large
    lbfgs = replace(recipe, optimizer="lbfgs")
    assert models_per_chunk(task, lbfgs, digits_small.train, memory_bytes=1 << 20) <= small


class _FakeClock:
    """A clock that advances by a chosen number of seconds per model of the chunk in flight."""

    def __init__(self, seconds_per_model: list[float]) -> None:
        self.now, self.rates, self.chunk = 0.0, list(seconds_per_model), 0

    def __call__(self) -> float:
        return self.now

    def finish(self, models: int) -> None:
        self.now += models * self.rates[min(self.chunk, len(self.rates) - 1)]
        self.chunk += 1


@pytest.mark.parametrize(("fit", "rates", "expected"), [
    # slow models (20 s each): after the first ten, 60 s / 20 s = 3 per chunk
    (100, [20.0], [10, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]),
    # 2 s each: a minute is 30 models
    (100, [2.0], [10, 30, 30, 30]),
    # tiny models (0.01 s each): after the first ten, all the rest up to what memory fits
    (100, [0.01], [10, 100, 40]),
    # memory fits only 4: never more, whatever the speed
    (4, [0.01], [4] * 13),
    # speed changes: the second chunk turns slow (6 s each), the next ones are cut down
    (100, [0.5, 6.0], [10, 100, 10, 10]),
])
def test_chunk_planner_bounds_what_a_kill_loses(fit, rates, expected):
    from tdatune.models.batched import ChunkPlanner

    clock = _FakeClock(rates)
    planner = ChunkPlanner(fit, clock=clock)
    jobs = list(range(sum(expected)))
    seen = []
    for chunk in planner.chunks(jobs):
        seen += chunk
        clock.finish(len(chunk))
    assert seen == jobs and planner.sizes == expected
    # What a kill may lose is one chunk: ten models before anything is measured, then a
    # chunk predicted (from the previous chunk's time per model) to take at most 60 s.
    per_model = [rates[min(i, len(rates) - 1)] for i in range(len(expected))]
    assert planner.sizes[0] <= 10
    for size, previous in zip(planner.sizes[1:], per_model[:-1], strict=True):
        assert size * previous <= 60.0 and size <= fit


def test_chunk_planner_shrinks_after_a_slow_chunk():
    from tdatune.models.batched import ChunkPlanner

    planner = ChunkPlanner(100)
    assert planner.size == 10
    assert planner.update(10, 300.0) == 2  # 30 s per model: two fit in a minute
    assert planner.update(2, 200.0) == 1  # slower still: one at a time
    assert planner.update(1, 0.001) == 100  # fast again: up to what memory fits
    assert ChunkPlanner(3).size == 3
    with pytest.raises(ValueError, match="chunk sizes"):
        ChunkPlanner(0)


def test_batched_chunk_resumes_bitwise_from_its_saved_state(digits_small, tmp_path, monkeypatch,
                                                             capsys):
    import tdatune.models.batched as batched_module
    from tdatune.utils.atomic import torch_load_verified

    task, train = _mlp_task(digits_small), digits_small.train
    recipe = TrainRecipe(optimizer="sgd", epochs=5, lr=0.05, batch_size=16, momentum=0.9,
                         weight_decay=1e-3)
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=4, alpha=0.5))
    seeds = [3, 4, 5, 6]
    whole = train_batched(task, train, masks, recipe, seeds)
    real = batched_module.epoch_permutation

    def killed_in_epoch_3(n, seed, epoch):
        if epoch == 3:
            raise KeyboardInterrupt("killed")
        return real(n, seed, epoch)

    state = tmp_path / ".chunk.pt"
    monkeypatch.setattr(batched_module, "epoch_permutation", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_batched(task, train, masks, recipe, seeds, state_path=state, save_seconds=0)
    monkeypatch.undo()
    assert torch_load_verified(state)["epoch"] == 2  # epochs 0, 1, 2 finished and saved
    resumed = train_batched(task, train, masks, recipe, seeds, state_path=state, save_seconds=0)
    assert "resuming a batched chunk of 4 models" in capsys.readouterr().err
    for k in whole.params:
        assert torch.equal(resumed.params[k], whole.params[k]), k
    assert torch.equal(resumed.objectives, whole.objectives)
    # A state saved for other models (other seeds) is not used.
    other = train_batched(task, train, masks, recipe, [7, 8, 9, 10], state_path=state)
    fresh = train_batched(task, train, masks, recipe, [7, 8, 9, 10])
    assert "resuming" not in capsys.readouterr().err
    assert all(torch.equal(other.params[k], fresh.params[k]) for k in fresh.params)
