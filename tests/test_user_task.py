"""Your own model: any batch structure, callable outputs, your own checkpoints and training
function, checked against by-hand computations; bad input stopped with the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tdatune.attributors import AttributionContext, make_attributor
from tdatune.data.base import ArrayDataset, as_dataset
from tdatune.evaluate.groundtruth import GroundTruthConfig, build_ground_truth, sample_subsets
from tdatune.features.gradients import per_example_grads
from tdatune.models.checkpoints import as_checkpoints
from tdatune.models.task import Task, check_task, make_task
from tdatune.models.training import TrainFunction, load_model

# ----------------------------------------------------------------- a dict-batch model


class TwoInputNet(nn.Module):
    """Takes features and a 0/1 mask as two arguments (like input_ids + attention_mask)."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 3)
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, 3]."""
        return torch.tanh(self.lin(feats * mask)) * self.scale


def call_two_input(model: nn.Module, batch: dict) -> torch.Tensor:
    """The task's forward: pick the model's inputs out of the dict batch."""
    return model(batch["feats"], batch["mask"])


def dict_loss(outputs: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-example cross-entropy against the batch's labels."""
    return nn.functional.cross_entropy(outputs, batch["labels"], reduction="none")


def chosen_logit(outputs: torch.Tensor, batch: dict) -> torch.Tensor:
    """A custom explained output: logit of class 2 minus logit of class 0."""
    return outputs[:, 2] - outputs[:, 0]


class DictDataset(Dataset):
    """Map-style dataset of dict examples."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.feats = torch.randn(n, 5, generator=gen)
        self.mask = (torch.rand(n, 5, generator=gen) > 0.2).float()
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"feats": self.feats[i], "mask": self.mask[i], "labels": self.labels[i]}


def dict_task() -> Task:
    return make_task(TwoInputNet, dict_loss, chosen_logit, forward=call_two_input, name="dict")


def test_dataloader_collated_in_index_order_whatever_the_shuffle():
    ds = DictDataset(11)
    data = as_dataset(DataLoader(ds, batch_size=4, shuffle=True))
    assert data.whole_batch
    torch.testing.assert_close(data.inputs["feats"], ds.feats)
    torch.testing.assert_close(data.targets["labels"], ds.labels)
    sub = data.subset(torch.tensor([3, 7]))
    assert sub.whole_batch and torch.equal(sub.inputs["labels"], ds.labels[[3, 7]])
    # as a Dataset it gives the same examples back
    assert torch.equal(data[5]["mask"], ds.mask[5])


def test_dict_batch_gradients_equal_a_by_hand_loop():
    ds = DictDataset(9)
    data = as_dataset(ds)
    task = dict_task()
    torch.manual_seed(0)
    model = TwoInputNet()
    params = {k: v.detach() for k, v in model.named_parameters()}
    for target, fn in (("loss", dict_loss), ("output", chosen_logit)):
        got = per_example_grads(task, model, params, data, target=target, chunk_size=4)
        rows = []
        for i in range(len(ds)):
            item = {k: v[None] for k, v in ds[i].items()}
            value = fn(model(item["feats"], item["mask"]), item)[0]
            grads = torch.autograd.grad(value, list(model.parameters()))
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- regression, dense check


def regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64) + 0.1 * torch.randn(
        n, generator=gen, dtype=torch.float64)
    return x, y


def squared_error(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example squared error of a [B, 1] prediction."""
    return (outputs[:, 0] - y) ** 2


def make_linear() -> nn.Module:
    return nn.Linear(4, 1).double()


def test_iffim_on_a_regression_task_equals_the_dense_solve():
    x, y = regression_data(30, 0)
    xt, yt = regression_data(5, 1)
    task = make_task(make_linear, squared_error, "prediction", name="linreg")
    torch.manual_seed(0)
    model = make_linear()
    ctx = AttributionContext(task, as_dataset(x, y), as_checkpoints(task, model), device="cpu")
    lam = 1e-2
    scores = make_attributor("iffim").fit(ctx).score(as_dataset(xt, yt), lam=lam)
    # by hand: g_i = 2 (w.x_i + b - y_i) [x_i, 1], v = [x', 1]
    w, b = model.weight.detach()[0], model.bias.detach()[0]
    ones = torch.ones(len(x), 1, dtype=x.dtype)
    g = 2 * (x @ w + b - y)[:, None] * torch.cat([x, ones], 1)
    v = torch.cat([xt, torch.ones(len(xt), 1, dtype=x.dtype)], 1)
    fisher = g.T @ g / len(x)
    dense = -(torch.linalg.solve(fisher + lam * torch.eye(5, dtype=x.dtype), v.T).T @ g.T)
    torch.testing.assert_close(scores.double(), dense, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------- your own training function

CALLS = {"n": 0, "fail_after": None}


def train_linear(data: ArrayDataset, seed: int) -> dict:
    """A user's loop: full-batch gradient descent on the data it is given."""
    CALLS["n"] += 1
    if CALLS["fail_after"] is not None and CALLS["n"] > CALLS["fail_after"]:
        raise KeyboardInterrupt
    torch.manual_seed(seed)
    model = make_linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=len(data))
    for _ in range(20):
        for xb, yb in loader:
            opt.zero_grad()
            squared_error(model(xb), yb).mean().backward()
            opt.step()
    return model.state_dict()


def _by_hand_outputs(masks: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     xt: torch.Tensor, config: GroundTruthConfig) -> np.ndarray:
    out = np.zeros((config.n_subsets, config.seeds_per_subset, len(xt)))
    for m in range(config.n_subsets):
        for s in range(config.seeds_per_subset):
            idx = masks[m].nonzero()[:, 0]
            state = train_linear(ArrayDataset(x[idx], y[idx]), config.model_seed(m, s))
            model = make_linear()
            model.load_state_dict(state)
            with torch.no_grad():
                out[m, s] = model(xt)[:, 0].numpy()
    return out


@pytest.mark.parametrize("backend", ["sequential", "process", "ray"])
def test_ground_truth_from_a_training_function_equals_by_hand(tmp_path, backend):
    x, y = regression_data(24, 0)
    xt, yt = regression_data(6, 1)
    task = make_task(make_linear, squared_error, "prediction", name="linreg")
    config = GroundTruthConfig(n_subsets=4, alpha=0.5, seeds_per_subset=2)
    recipe = TrainFunction(train_linear)
    options: dict = {"num_workers": 2} if backend == "process" else {}
    if backend == "ray":
        pytest.importorskip("ray")
        # Ray workers import this test module by name: give them its directory.
        options = {"models_per_task": 3, "init_options": {
            "num_cpus": 2, "runtime_env": {"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}}}}
    gt = build_ground_truth(task, recipe, as_dataset(x, y), as_dataset(xt, yt), config,
                            tmp_path, backend=backend, backend_options=options,
                            show_progress=False)
    masks = sample_subsets(len(x), config)
    assert torch.equal(gt.masks, masks)
    np.testing.assert_allclose(gt.outputs, _by_hand_outputs(masks, x, y, xt, config),
                               rtol=1e-10, atol=1e-12)


def test_ground_truth_from_a_training_function_resumes_after_an_interruption(tmp_path):
    x, y = regression_data(24, 0)
    xt, yt = regression_data(6, 1)
    task = make_task(make_linear, squared_error, "prediction", name="linreg")
    config = GroundTruthConfig(n_subsets=5, alpha=0.5)
    args = (task, TrainFunction(train_linear), as_dataset(x, y), as_dataset(xt, yt), config,
            tmp_path)
    # 2 calls check once that the function depends on its data, then 3 models finish
    CALLS.update(n=0, fail_after=5)
    try:
        with pytest.raises(KeyboardInterrupt):
            build_ground_truth(*args, backend="sequential", show_progress=False)
        assert len(list((tmp_path / "models").glob("m*.npy"))) == 3
        assert not (tmp_path / "outputs.npy").exists()
        CALLS.update(n=0, fail_after=None)
        gt = build_ground_truth(*args, backend="sequential", show_progress=False)
        assert CALLS["n"] == 2  # only the two unfinished models (the check is not redone)
    finally:
        CALLS.update(n=0, fail_after=None)
    masks = sample_subsets(len(x), config)
    np.testing.assert_allclose(gt.outputs, _by_hand_outputs(masks, x, y, xt, config),
                               rtol=1e-10, atol=1e-12)
    # another training function is refused in the same directory
    other = TrainFunction(train_linear, name="someone-else")
    with pytest.raises(ValueError, match="different configuration"):
        build_ground_truth(task, other, *args[2:], backend="sequential", show_progress=False)


# ----------------------------------------------------------------- bad input, with the fix


def test_loss_that_is_not_per_example_is_refused_with_the_fix():
    task = make_task(make_linear, lambda out, y: ((out[:, 0] - y) ** 2).mean(), "prediction")
    x, y = regression_data(6, 0)
    with pytest.raises(ValueError, match=r"loss function .* one value per example.*reduction='none'"):
        check_task(task, as_dataset(x, y))


def test_output_of_the_wrong_shape_is_refused_with_the_fix():
    task = make_task(make_linear, squared_error, lambda out, y: out)
    x, y = regression_data(6, 0)
    with pytest.raises(ValueError, match=r"output function .* shape \[3\].*returned \[3, 1\]"):
        check_task(task, as_dataset(x, y))


def test_checkpoint_with_other_keys_is_refused_naming_them():
    task = make_task(make_linear, squared_error, "prediction")
    bad = {"module.weight": torch.zeros(1, 4), "module.bias": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"missing keys \['weight', 'bias'\].*module\."):
        as_checkpoints(task, [bad])
    wrong_shape = {"weight": torch.zeros(1, 3), "bias": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"weight has shape \[1, 3\] but the model's is \[1, 4\]"):
        load_model(task, wrong_shape)


def test_batch_the_model_cannot_take_is_refused_with_the_fix():
    task = make_task(TwoInputNet, dict_loss, chosen_logit, name="dict")  # no forward=
    with pytest.raises(ValueError, match=r"cannot take a batch.*model\(\*\*x\).*forward="):
        check_task(task, as_dataset(DictDataset(4)))


def test_ground_truth_checks_before_retraining(tmp_path):
    task = make_task(make_linear, lambda out, y: out.sum(), "prediction")
    x, y = regression_data(8, 0)
    with pytest.raises(ValueError, match="one value per example"):
        build_ground_truth(task, TrainFunction(train_linear), as_dataset(x, y),
                           as_dataset(x, y), GroundTruthConfig(n_subsets=2), tmp_path,
                           show_progress=False)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_attribution_context_refuses_bad_input_before_any_gradient():
    x, y = regression_data(8, 0)
    good = make_task(make_linear, squared_error, "prediction", name="linreg")
    state = make_linear().state_dict()
    with pytest.raises(ValueError, match=r"checkpoint 1 does not match .* missing keys \['bias'\]"):
        AttributionContext(good, as_dataset(x, y), [state, {"weight": state["weight"]}])
    summed = make_task(make_linear, lambda out, y: squared_error(out, y).sum(), "prediction")
    with pytest.raises(ValueError, match=r"loss function .* one value per example"):
        AttributionContext(summed, as_dataset(x, y), [state])


def test_training_function_run_is_saved_and_reused(tmp_path):
    from tdatune.models.training import train_model

    x, y = regression_data(12, 0)
    task = make_task(make_linear, squared_error, "prediction", name="linreg")
    recipe = TrainFunction(train_linear)
    CALLS.update(n=0, fail_after=None)
    first = train_model(task, as_dataset(x, y), recipe, seed=3, checkpoint_dir=tmp_path)
    again = train_model(task, as_dataset(x, y), recipe, seed=3, checkpoint_dir=tmp_path)
    assert CALLS["n"] == 1  # the second call read the saved states
    for k, v in first.state.items():
        assert torch.equal(v, again.state[k])
    by_hand = train_linear(ArrayDataset(x, y), 3)
    for k, v in by_hand.items():
        torch.testing.assert_close(first.state[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="different training run"):
        train_model(task, as_dataset(x, y), recipe, seed=4, checkpoint_dir=tmp_path)
    CALLS.update(n=0)


def test_checkpoints_from_files_modules_and_nested_dicts(tmp_path):
    task = make_task(make_linear, squared_error, "prediction", name="linreg")
    models = [make_linear() for _ in range(3)]
    torch.save(models[0].state_dict(), tmp_path / "a.pt")
    torch.save({"epoch": 7, "model_state_dict": models[1].state_dict()}, tmp_path / "b.pt")
    states = as_checkpoints(task, [tmp_path / "a.pt", str(tmp_path / "b.pt"), models[2]])
    for state, model in zip(states, models, strict=True):
        for k, v in model.state_dict().items():
            assert torch.equal(state[k], v)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        as_checkpoints(task, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not a model state"):
        as_checkpoints(task, [{"epoch": 3}])


def test_attribute_selects_on_validation_like_a_by_hand_pipeline(tmp_path):
    """attribute(): lambda from the validation set's xi on the dense Fisher's spectrum, test
    scores at that lambda equal the dense solve, and the xi plot is written."""
    from tdatune.select import select_lambda
    from tdatune.study.attribute import attribute

    x, y = regression_data(30, 0)
    xv, yv = regression_data(8, 2)
    xt, yt = regression_data(5, 1)
    task = make_task(make_linear, squared_error, "prediction", name="linreg")
    torch.manual_seed(0)
    model = make_linear()
    result = attribute(task, (x, y), (xt, yt), val=(xv, yv), checkpoints=[model.state_dict()],
                       plot=tmp_path / "xi.png", rule="xi")
    w, b = model.weight.detach()[0], model.bias.detach()[0]
    g = 2 * (x @ w + b - y)[:, None] * torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    fisher = g.T @ g / len(x)
    sigma, u = torch.linalg.eigh(fisher)
    v_val = torch.cat([xv, torch.ones(len(xv), 1, dtype=x.dtype)], 1)
    by_hand = select_lambda(sigma, v_val @ u, grid=result.selection.grid)
    assert result.lam == pytest.approx(by_hand.lam, rel=1e-6)
    assert result.selection.status == by_hand.status and result.selection.n_dropped == 0
    v = torch.cat([xt, torch.ones(len(xt), 1, dtype=x.dtype)], 1)
    dense = -(torch.linalg.solve(fisher + result.lam * torch.eye(5, dtype=x.dtype), v.T).T @ g.T)
    torch.testing.assert_close(result.scores.double(), dense, rtol=1e-5, atol=1e-8)
    assert (tmp_path / "xi.png").stat().st_size > 1000
    # the default rule: the 0.9 quantile of the dense Fisher's non-zero eigenvalues (numpy's
    # linear interpolation), Algorithm 1's lambda kept beside it
    default = attribute(task, (x, y), (xt, yt), val=(xv, yv), checkpoints=[model.state_dict()])
    nonzero = sigma[sigma > 1e-10 * sigma.max()].numpy()
    assert default.lam == pytest.approx(float(np.quantile(nonzero, 0.9)), rel=1e-9)
    assert default.selection.rule == "quantile"
    assert default.selection.xi_lambda == pytest.approx(by_hand.lam, rel=1e-6)


def test_train_model_refuses_a_mean_loss_before_training():
    from tdatune.models.training import TrainRecipe, train_model

    x, y = regression_data(10, 0)
    task = make_task(make_linear, lambda out, y: squared_error(out, y).mean(), "prediction")
    with pytest.raises(ValueError, match=r"loss function .* returned \[\]"):
        train_model(task, as_dataset(x, y), TrainRecipe(epochs=1), seed=0)
