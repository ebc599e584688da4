"""The written-out SGD path for chains of Linear layers and ReLUs, against train_model (autograd
and torch's SGD, one model at a time) and against hand-worked sizes."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

import tdatune.models.batched as batched_module
from tdatune.evaluate.groundtruth import GroundTruthConfig, sample_subsets
from tdatune.models.batched import models_per_chunk, train_batched
from tdatune.models.linear_chain import chain_for, chain_models_in_cache, find_linear_chain
from tdatune.models.small import MLP, LogisticRegression
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe, train_model
from tdatune.utils.memory import last_level_cache_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NoBiasChain(nn.Module):
    """Linear (no bias), ReLU, Linear, ReLU on the logits: a chain with the unusual cases."""

    def __init__(self, d: int, classes: int) -> None:
        super().__init__()
        self.first = nn.Linear(d, 9, bias=False)
        self.act = nn.ReLU()
        self.out = nn.Linear(9, classes)
        self.last = nn.ReLU()

    def forward(self, x):
        return self.last(self.out(self.act(self.first(x.flatten(1)))))


class Residual(nn.Module):
    """Linear and ReLU modules, but the forward adds a skip: not the chain its modules suggest."""

    def __init__(self, d: int, num_classes: int) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.relu = nn.ReLU()
        self.b = nn.Linear(d, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.b(self.relu(self.a(x)) + x)


class TanhMLP(nn.Module):
    def __init__(self, d: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.net(x.flatten(1))


def _task(make, name: str = "t") -> Task:
    return Task(make_model=make, name=name)


def _sgd(**kw) -> TrainRecipe:
    base = dict(optimizer="sgd", epochs=3, lr=0.05, batch_size=16, momentum=0.9,
                weight_decay=1e-3, schedule="cosine")
    base.update(kw)
    return TrainRecipe(**base)


def _no_autograd_path(monkeypatch) -> None:
    """Make the autograd path fail, so a passing run proves the chain path trained it."""
    def refuse(*_a, **_k):
        raise AssertionError("the autograd path was taken")
    monkeypatch.setattr(batched_module, "_AutogradStepper", refuse)


CASES = [
    ("mlp two hidden", lambda d, c: MLP(d, (12, 7), c), {}),
    ("logistic regression", lambda d, c: LogisticRegression(d, c), {}),
    ("no bias, relu on logits", NoBiasChain, {}),
    ("no momentum, no weight decay", lambda d, c: MLP(d, (10,), c),
     {"momentum": 0.0, "weight_decay": 0.0, "schedule": "constant"}),
]


@pytest.mark.parametrize("label,make,recipe_kw", CASES, ids=[c[0] for c in CASES])
def test_chain_path_equals_train_model_alone(digits_small, monkeypatch, label, make, recipe_kw):
    train, classes = digits_small.train, digits_small.num_classes
    task = _task(partial(make, 64, classes))
    recipe = _sgd(**recipe_kw)
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=3, alpha=0.55, subset_seed=4))
    seeds = [2, 13, 7]
    _no_autograd_path(monkeypatch)
    result = train_batched(task, train, masks, recipe, seeds)
    for m, seed in enumerate(seeds):
        alone = train_model(task, train.subset(masks[m]), recipe, seed)
        for name, value in alone.state.items():
            assert result.state(m)[name].shape == value.shape, name
            assert torch.allclose(result.state(m)[name], value, atol=2e-5, rtol=1e-4), name
        assert result.objectives[m] == pytest.approx(alone.history[-1]["train_objective"],
                                                     rel=1e-5)


def test_a_last_batch_smaller_than_the_others_is_averaged_over_its_own_rows(digits_small,
                                                                           monkeypatch):
    # 66 members with batches of 16: the fifth step has 2 rows, whose mean divides by 2.
    train = digits_small.train
    task = _task(partial(MLP, 64, (8,), digits_small.num_classes))
    recipe = _sgd(epochs=2)
    masks = torch.zeros(1, len(train), dtype=torch.bool)
    masks[0, torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:66]] = True
    _no_autograd_path(monkeypatch)
    result = train_batched(task, train, masks, recipe, [5])
    alone = train_model(task, train.subset(masks[0]), recipe, 5)
    for name, value in alone.state.items():
        assert torch.allclose(result.state(0)[name], value, atol=2e-5, rtol=1e-4), name


@pytest.mark.parametrize("make,recipe,why", [
    (TanhMLP, _sgd(), "tanh is not a chain activation"),
    (Residual, _sgd(), "the forward is not what the modules suggest"),
    (partial(MLP, hidden=(8,)), _sgd(optimizer="adam"), "adam"),
    (partial(MLP, hidden=(8,)), _sgd(grad_clip=1.0), "clipping"),
], ids=["tanh", "residual", "adam", "clip"])
def test_anything_else_goes_through_autograd_and_still_equals_train_model(digits_small, make,
                                                                          recipe, why):
    train, classes = digits_small.train, digits_small.num_classes
    task = _task(partial(make, 64, num_classes=classes))
    model = task.make_model()
    assert chain_for(task, recipe, model, train.inputs, train.targets) is None, why
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=2, alpha=0.5, subset_seed=1))
    result = train_batched(task, train, masks, recipe, [0, 1])
    alone = train_model(task, train.subset(masks[1]), recipe, 1)
    for name, value in alone.state.items():
        assert torch.allclose(result.state(1)[name], value, atol=2e-5, rtol=1e-4), name


def test_a_custom_forward_or_loss_is_not_taken_for_a_chain(digits_small):
    train = digits_small.train
    make = partial(MLP, 64, (8,), digits_small.num_classes)
    recipe = _sgd()
    plain = _task(make)
    assert chain_for(plain, recipe, plain.make_model(), train.inputs, train.targets) is not None
    doubled = Task(make_model=make, name="d", forward=lambda model, x: 2 * model(x))
    assert chain_for(doubled, recipe, doubled.make_model(), train.inputs, train.targets) is None
    smoothed = Task(make_model=make, name="s", loss_fn=lambda out, y: nn.functional.cross_entropy(
        out, y, reduction="none", label_smoothing=0.1))
    assert chain_for(smoothed, recipe, smoothed.make_model(), train.inputs,
                     train.targets) is None
    # Layers are read in order: widths 64 -> 8 -> classes.
    chain = find_linear_chain(plain, plain.make_model(), train.inputs[0])
    assert [(c.in_features, c.out_features, c.relu) for c in chain] == \
        [(64, 8, True), (8, digits_small.num_classes, False)]


def test_chain_models_in_cache_by_hand():
    # Chain 10 -> 7 (ReLU) -> 3: parameters 10*7 + 7 + 7*3 + 3 = 101; widths 10 + 7 + 3 = 20.
    # Per model with 5 rows of float64: 8 * (2 * 101 + 2 * 5 * 20) = 3216 bytes. Half of a
    # 100,000-byte cache is 50,000 bytes: 15.55 models, so 15 (rounding would say 16).
    task = _task(partial(MLP, 10, (7,), 3))
    model = task.make_model().double()
    chain = find_linear_chain(task, model, torch.zeros(10, dtype=torch.float64))
    assert chain_models_in_cache(chain, 5, 8, 100_000) == 15
    assert chain_models_in_cache(chain, 5, 8, 1_000) == 1  # never fewer than one


def test_models_per_chunk_caps_a_chain_on_cpu_at_the_cache_and_nothing_else(digits_small):
    train = digits_small.train
    recipe = _sgd(batch_size=16)
    chain_task = _task(partial(MLP, 64, (16,), digits_small.num_classes))
    tanh_task = _task(partial(TanhMLP, 64, digits_small.num_classes))
    # MLP 64 -> 16 -> 10: 64*16 + 16 + 16*10 + 10 = 1210 parameters, widths 90; per model
    # 4 * (2 * 1210 + 2 * 16 * 90) = 21,200 bytes; half of 1 MiB holds 24 of them.
    assert models_per_chunk(chain_task, recipe, train, cache_bytes=1 << 20) == 24
    assert models_per_chunk(chain_task, recipe, train, cache_bytes=1 << 40) > 24
    uncapped = models_per_chunk(tanh_task, recipe, train, cache_bytes=1 << 20)
    assert uncapped > 24


def test_a_state_saved_by_the_other_path_is_not_resumed(digits_small, tmp_path, monkeypatch,
                                                        capsys):
    task = _task(partial(MLP, 64, (8,), digits_small.num_classes))
    train, recipe = digits_small.train, _sgd(epochs=3)
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=2, alpha=0.5))
    state = tmp_path / ".chunk.pt"
    real = batched_module.epoch_permutation

    def killed_in_epoch_2(n, seed, epoch):
        if epoch == 2:
            raise KeyboardInterrupt("killed")
        return real(n, seed, epoch)

    monkeypatch.setattr(batched_module, "epoch_permutation", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):  # the chain path saves after epochs 0 and 1
        train_batched(task, train, masks, recipe, [0, 1], state_path=state, save_seconds=0)
    monkeypatch.undo()
    monkeypatch.setattr(batched_module, "chain_for", lambda *a, **k: None)
    resumed = train_batched(task, train, masks, recipe, [0, 1], state_path=state)
    assert "resuming" not in capsys.readouterr().err
    fresh = train_batched(task, train, masks, recipe, [0, 1])
    assert all(torch.equal(resumed.params[k], fresh.params[k]) for k in fresh.params)


def test_last_level_cache_is_the_highest_level_listed(tmp_path):
    for index, level, size in (("index0", 1, "48K"), ("index3", 3, "32768K"),
                               ("index2", 2, "2M")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "level").write_text(f"{level}\n")
        (tmp_path / index / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 32768 * 1024
    (tmp_path / "index4").mkdir()
    (tmp_path / "index4" / "level").write_text("4\n")
    (tmp_path / "index4" / "size").write_text("1G\n")
    assert last_level_cache_bytes(tmp_path) == 1 << 30
    assert last_level_cache_bytes(tmp_path / "absent") is None
