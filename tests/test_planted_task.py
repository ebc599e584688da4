"""Tests that catch bugs planted in the task layer and the ground truth's seeding: a model
factory that never re-initialises, a check that lets NaN through, a dict batch passed
positionally, and replicate seeds that do not reach the retrained models.

Every expectation is computed independently of the code under test: models built by hand
under chosen torch seeds, hand-worked forward passes, subsets drawn here and models retrained
here with the training seed written out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdatune.data.base import ArrayDataset
from tdatune.evaluate.groundtruth import GroundTruthConfig, RetrainJob, build_ground_truth
from tdatune.evaluate.runners import make_runner
from tdatune.features.gradients import per_example_grads
from tdatune.models.task import ModuleFactory, Task, check_task, make_task
from tdatune.models.training import TrainRecipe, train_model

# ----------------------------------------------------------------- 1. ModuleFactory re-init


def small_net() -> nn.Module:
    """Two linear layers around a tanh (both have reset_parameters)."""
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a module's state."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bitwise equality of two states."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def built_under(seed: int) -> dict[str, torch.Tensor]:
    """What a fresh small_net() holds when built right after torch.manual_seed(seed): the
    constructor resets the layers in the order modules() visits them, as a re-initialising
    factory must."""
    torch.manual_seed(seed)
    return weights(small_net())


def test_module_factory_reinitialises_from_the_torch_seed() -> None:
    torch.manual_seed(123)
    given = small_net()
    original = weights(given)
    factory = ModuleFactory(given)
    torch.manual_seed(1)
    a = weights(factory())
    torch.manual_seed(2)
    b = weights(factory())
    torch.manual_seed(1)
    c = weights(factory())
    assert not same(a, b), "two training seeds gave the same initialisation"
    assert same(a, c), "the same seed gave two initialisations"
    assert same(a, built_under(1)) and same(b, built_under(2))
    assert not same(a, original)
    assert same(weights(given), original), "the factory changed the module it was given"


def test_module_factory_without_reinit_keeps_the_given_weights() -> None:
    torch.manual_seed(123)
    given = small_net()
    original = weights(given)
    factory = ModuleFactory(given, reinit=False)
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = factory()
        assert model is not given
        assert same(weights(model), original)
        with torch.no_grad():
            model[0].weight.add_(1.0)  # a copy: changing it leaves the given module alone
    assert same(weights(given), original)


def test_make_task_from_a_module_passes_reinit_on() -> None:
    torch.manual_seed(123)
    given = small_net()
    original = weights(given)
    fresh = make_task(given, loss="cross_entropy", output="margin")
    kept = make_task(given, loss="cross_entropy", output="margin", reinit=False)
    torch.manual_seed(5)
    assert same(weights(fresh.make_model()), built_under(5))
    torch.manual_seed(6)
    assert same(weights(fresh.make_model()), built_under(6))
    torch.manual_seed(5)
    assert same(weights(kept.make_model()), original)


# ----------------------------------------------------------------- 2. check_task finite check


def nan_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One value per example, all NaN."""
    return torch.full((outputs.shape[0],), float("nan"))


def inf_output(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One value per example, the second one +inf."""
    out = outputs[:, 0].clone()
    out[1] = float("inf")
    return out


class NaNNet(nn.Module):
    """A linear model whose logits are NaN (a diverged model)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits times NaN."""
        return self.lin(x) * float("nan")


def probe_data() -> ArrayDataset:
    """Five finite examples of three features, labels 0/1."""
    gen = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.randn(5, 3, generator=gen), torch.tensor([0, 1, 0, 1, 1]))


def test_check_task_refuses_a_nan_loss_naming_it() -> None:
    task = Task(make_model=small_net, loss_fn=nan_loss, output="margin", name="nan-task")
    with pytest.raises(ValueError, match=r"loss function .*nan_loss.* non-finite"):
        check_task(task, probe_data())


def test_check_task_refuses_an_inf_output_naming_it() -> None:
    task = Task(make_model=small_net, output=inf_output, name="inf-task")
    with pytest.raises(ValueError, match=r"output function .*inf_output.* non-finite"):
        check_task(task, probe_data())


def test_check_task_refuses_nan_model_outputs_naming_the_loss() -> None:
    task = Task(make_model=NaNNet, name="nan-model")
    with pytest.raises(ValueError, match=r"loss function .*cross_entropy.* non-finite"):
        check_task(task, probe_data())


def test_check_task_accepts_finite_values() -> None:
    check_task(Task(make_model=small_net), probe_data())  # no error


# ----------------------------------------------------------------- 3. dict batch by keyword


class KeywordOrder(nn.Module):
    """forward(b, a): the parameters are declared in the opposite order of the batch's keys,
    and swapping a and b changes the result."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([2.0, -3.0]))

    def forward(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """w * a - b, [B, 2]."""
        return self.w * a - b


def first_minus_second(outputs: torch.Tensor, batch: dict) -> torch.Tensor:
    """Output column 0 minus column 1, [B]."""
    return outputs[:, 0] - outputs[:, 1]


def squared_norm(outputs: torch.Tensor, batch: dict) -> torch.Tensor:
    """A per-example loss: the squared norm of the outputs, [B]."""
    return (outputs**2).sum(-1)


def keyword_batch() -> dict[str, torch.Tensor]:
    """{'a': ..., 'b': ...} in that insertion order (the reverse of forward's)."""
    gen = torch.Generator().manual_seed(3)
    return {"a": torch.randn(4, 2, generator=gen), "b": torch.randn(4, 2, generator=gen)}


def test_dict_batch_is_passed_by_keyword() -> None:
    model = KeywordOrder()
    batch = keyword_batch()
    a, b = batch["a"], batch["b"]
    by_hand = torch.tensor([2.0, -3.0]) * a - b
    swapped = torch.tensor([2.0, -3.0]) * b - a
    assert not torch.allclose(by_hand, swapped)  # the test can tell the two apart
    task = Task(make_model=KeywordOrder, loss_fn=squared_norm, output=first_minus_second)
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = task.call(model, params, batch)
    torch.testing.assert_close(got, by_hand)
    torch.testing.assert_close(got, model(**batch).detach())
    # other parameters than the module's own are used (functional call)
    doubled = {"w": torch.tensor([4.0, -6.0])}
    torch.testing.assert_close(task.call(model, doubled, batch), 2 * torch.tensor([2.0, -3.0]) * a - b)
    # and the same through evaluate, check_task and the per-example gradients
    data = ArrayDataset(batch)
    check_task(task, data)
    out = task.evaluate(model, params, data.inputs, data.targets)
    torch.testing.assert_close(out, by_hand[:, 0] - by_hand[:, 1])
    grads = per_example_grads(task, model, params, data, target="loss", chunk_size=2)
    # loss_i = sum_k (w_k a_ik - b_ik)^2  =>  d/dw_k = 2 (w_k a_ik - b_ik) a_ik
    torch.testing.assert_close(grads, 2 * by_hand * a)


# ----------------------------------------------------------------- 4. replicate seeds

N_TRAIN, N_EXPLAINED, TRAIN_SEED, SUBSET_SEED = 24, 5, 7, 11
RECIPE = TrainRecipe(optimizer="sgd", epochs=3, lr=0.2, batch_size=8, momentum=0.9)


def mlp() -> nn.Module:
    """A tiny non-convex classifier: different seeds end in different models."""
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def gt_data() -> tuple[ArrayDataset, ArrayDataset]:
    """24 training and 5 explained examples of 4 features, 3 classes."""
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(N_TRAIN + N_EXPLAINED, 4, generator=gen)
    y = torch.randint(0, 3, (N_TRAIN + N_EXPLAINED,), generator=gen)
    return ArrayDataset(x[:N_TRAIN], y[:N_TRAIN]), ArrayDataset(x[N_TRAIN:], y[N_TRAIN:])


def my_masks(n_subsets: int, n: int, alpha: float, seed: int) -> torch.Tensor:
    """The subsets as documented: one generator seeded with subset_seed, round(alpha * n)
    members of each from one randperm per subset."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_subsets, n, dtype=torch.bool)
    for m in range(n_subsets):
        masks[m, torch.randperm(n, generator=gen)[: round(alpha * n)]] = True
    return masks


def my_margins(state: dict[str, torch.Tensor], explained: ArrayDataset) -> np.ndarray:
    """log(p_y / (1 - p_y)) of a model holding ``state``, computed by hand."""
    model = mlp()
    model.load_state_dict(state)
    with torch.no_grad():
        logp = F.log_softmax(model(explained.inputs).double(), dim=1)
    y = explained.targets
    p_y = logp.gather(1, y[:, None]).squeeze(1).exp()
    return torch.log(p_y / (1 - p_y)).numpy()


def my_retrain(train: ArrayDataset, explained: ArrayDataset, mask: torch.Tensor,
               seed: int) -> np.ndarray:
    """Train the model on the subset chosen here, with the seed passed explicitly."""
    task = Task(make_model=mlp)
    state = train_model(task, ArrayDataset(train.inputs[mask], train.targets[mask]), RECIPE,
                        seed).state
    return my_margins(state, explained)


@pytest.mark.parametrize("backend", ["sequential", "batched"])
def test_ground_truth_replicates_use_their_own_seeds(tmp_path, backend: str) -> None:
    train, explained = gt_data()
    config = GroundTruthConfig(n_subsets=3, alpha=0.5, seeds_per_subset=2,
                               subset_seed=SUBSET_SEED, train_seed=TRAIN_SEED)
    options = {"chunk_size": 6} if backend == "batched" else None
    gt = build_ground_truth(Task(make_model=mlp), RECIPE, train, explained, config,
                            tmp_path / backend, show_progress=False, backend=backend,
                            backend_options=options)
    assert gt.outputs.shape == (3, 2, N_EXPLAINED)
    masks = my_masks(3, N_TRAIN, 0.5, SUBSET_SEED)
    assert torch.equal(gt.masks, masks)
    for m in range(3):
        assert np.abs(gt.outputs[m, 0] - gt.outputs[m, 1]).max() > 1e-3, \
            f"the two replicates of subset {m} are the same model"
        for s in range(2):
            # the documented seed of subset m, replicate s
            want = my_retrain(train, explained, masks[m], TRAIN_SEED + 10_000 * s + m)
            np.testing.assert_allclose(gt.outputs[m, s], want, rtol=1e-4, atol=1e-5,
                                       err_msg=f"subset {m}, replicate {s}")


@pytest.mark.parametrize("backend", ["sequential", "batched", "process"])
def test_runners_train_each_job_with_its_own_seed_and_subset(backend: str) -> None:
    """Jobs built here: the same seed on two subsets, two seeds on one subset."""
    train, explained = gt_data()
    masks = my_masks(2, N_TRAIN, 0.5, SUBSET_SEED)
    jobs = [RetrainJob(0, 0, 101), RetrainJob(1, 0, 101), RetrainJob(0, 1, 202)]
    options = {"batched": {"chunk_size": 3},
               "process": {"num_workers": 1, "threads_per_worker": 1},
               }.get(backend, {})
    run = make_runner(backend, Task(make_model=mlp), RECIPE, train, explained, masks,
                      show_progress=False, **options)
    got: dict[tuple[int, int], np.ndarray] = {}
    run(jobs, lambda job, out: got.__setitem__((job.subset, job.replicate), out))
    assert set(got) == {(0, 0), (1, 0), (0, 1)}
    assert np.abs(got[(0, 0)] - got[(1, 0)]).max() > 1e-3, "equal seeds, different subsets"
    assert np.abs(got[(0, 0)] - got[(0, 1)]).max() > 1e-3, "one subset, different seeds"
    for (m, s), seed in (((0, 0), 101), ((1, 0), 101), ((0, 1), 202)):
        np.testing.assert_allclose(got[(m, s)], my_retrain(train, explained, masks[m], seed),
                                   rtol=1e-4, atol=1e-5, err_msg=f"job {(m, s, seed)}")
