"""What a Hugging Face user meets: ModelOutput logits read by the built-in losses and outputs,
save_pretrained directories as checkpoints, prefixed state dicts, labels out of range named by
example, TracIn without a validation set, and a per-setting data directory in sweeps.

The BERT tests build a tiny BertForSequenceClassification from a config (nothing is
downloaded) and are skipped without transformers; everything else runs without it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdatune.data.base import ArrayDataset
from tdatune.models.checkpoints import as_checkpoints
from tdatune.models.outputs import (
    cross_entropy,
    loss_output,
    margin,
    mse,
    negative_loss,
    prediction,
    probability,
)
from tdatune.models.task import Task, check_task, make_task
from tdatune.study.attribute import attribute

# ----------------------------------------------------------------- a. ModelOutput logits


class FakeOutput:
    """An object with a ``logits`` attribute, as a ModelOutput has."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.loss = None


def hand_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(p_y / (1 - p_y)) from a softmax, by hand."""
    p = torch.softmax(logits.double(), dim=1).gather(1, y[:, None]).squeeze(1)
    return torch.log(p / (1 - p)).float()


def test_builtin_outputs_read_the_logits_of_a_model_output() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=gen)
    y = torch.tensor([0, 3, 1, 1, 2])
    ce = -torch.log_softmax(logits, 1)[torch.arange(5), y]
    p_y = torch.softmax(logits, 1)[torch.arange(5), y]
    for outputs in (FakeOutput(logits), {"logits": logits, "loss": None}):
        for targets in (y, {"input_ids": torch.zeros(5, 3), "labels": y}):
            torch.testing.assert_close(cross_entropy(outputs, targets), ce)
            torch.testing.assert_close(loss_output(outputs, targets), ce)
            torch.testing.assert_close(negative_loss(outputs, targets), -ce)
            torch.testing.assert_close(probability(outputs, targets), p_y)
            torch.testing.assert_close(margin(outputs, targets), hand_margin(logits, y),
                                       rtol=1e-4, atol=1e-5)
    reg = torch.randn(5, 1, generator=gen)
    target = torch.randn(5, generator=gen)
    torch.testing.assert_close(prediction(FakeOutput(reg)), reg[:, 0])
    torch.testing.assert_close(mse(FakeOutput(reg), {"labels": target}), (reg[:, 0] - target) ** 2)


class TupleNet(nn.Module):
    """Returns a tuple (like return_dict=False): no logits to find."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, hidden)."""
        return self.lin(x), x


def test_outputs_without_logits_say_how_to_give_them() -> None:
    with pytest.raises(TypeError, match=r"forward=.*\.logits"):
        margin((torch.zeros(2, 3), None), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"'labels'"):
        margin(torch.zeros(2, 3), {"label": torch.tensor([0, 1])})
    data = ArrayDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"cross_entropy failed .*forward=.*\.logits"):
        check_task(Task(make_model=TupleNet), data)


# ----------------------------------------------------------------- the tiny BERT

VOCAB, CLASSES, LENGTH = 50, 3, 8


def tiny_bert() -> nn.Module:
    """BertForSequenceClassification: hidden 16, one layer, two heads, vocabulary 50."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=LENGTH, num_labels=CLASSES)
    return BertForSequenceClassification(config)


def bert_batch(n: int, seed: int, *, padded: bool = False) -> dict[str, torch.Tensor]:
    """A tokenized batch: input_ids, attention_mask (every other example padded after 5
    tokens when ``padded``) and labels."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    if padded:
        mask[::2, 5:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (n, LENGTH), generator=gen),
            "attention_mask": mask,
            "labels": torch.randint(0, CLASSES, (n,), generator=gen)}


def masked_forward(model: nn.Module, x: dict[str, torch.Tensor]) -> Any:
    """docs/your_model.md's forward for padded batches: a 4-D additive attention mask."""
    mask = x["attention_mask"][:, None, None, :].float()
    return model(input_ids=x["input_ids"],
                 attention_mask=(1.0 - mask) * torch.finfo(torch.float32).min)


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    """One tiny BERT in eval mode (the weights every test below reads)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return tiny_bert().eval()


def test_bert_model_output_needs_no_forward(bert: nn.Module) -> None:
    task = make_task(tiny_bert, loss="cross_entropy", output="margin", name="bert")
    batch = bert_batch(6, 1)
    data = ArrayDataset(batch)
    check_task(task, data)  # model(**x) with labels in the batch; logits read from the output
    params = {k: v.detach() for k, v in bert.named_parameters()}
    with torch.no_grad():
        out = bert(**batch)
    torch.testing.assert_close(task.evaluate(bert, params, data.inputs, data.targets),
                               hand_margin(out.logits, batch["labels"]), rtol=1e-4, atol=1e-5)
    losses = task.evaluate(bert, params, data.inputs, data.targets, fn="loss")
    torch.testing.assert_close(losses.mean(), out.loss)  # the model's own mean loss


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.filterwarnings("ignore:the selected lambda")
def test_bert_attribution_runs_its_own_forward_with_a_padded_mask(bert: nn.Module) -> None:
    """model(**x) with a 2-D attention mask and padding needs no forward=: the layer hooks
    never run the model under vmap. Its scores equal those of the hand-written 4-D mask
    forward (the path users needed before), whose gradients vmap computes."""
    train, val, test = bert_batch(12, 2, padded=True), bert_batch(6, 3), bert_batch(4, 4)
    plain = make_task(tiny_bert, loss="cross_entropy", output="margin", name="bert")
    task = make_task(tiny_bert, loss="cross_entropy", output="margin", name="bert",
                     forward=masked_forward)
    params = {k: v.detach() for k, v in bert.named_parameters()}
    data = ArrayDataset(train)
    torch.testing.assert_close(task.evaluate(bert, params, data.inputs, data.targets),
                               plain.evaluate(bert, params, data.inputs, data.targets))
    ours = attribute(plain, train, test, val=val, checkpoints=bert, attributor="iffim")
    hand = attribute(task, train, test, val=val, checkpoints=bert, attributor="iffim")
    assert ours.scores.shape == (4, 12) and bool(torch.isfinite(ours.scores).all())
    assert ours.lam == pytest.approx(hand.lam, rel=1e-3)
    torch.testing.assert_close(ours.scores, hand.scores, rtol=2e-3, atol=1e-4 * float(
        hand.scores.abs().max()))


# ----------------------------------------------------------------- b. save_pretrained


def test_a_save_pretrained_directory_is_a_checkpoint(bert: nn.Module, tmp_path: Path) -> None:
    bert.save_pretrained(tmp_path / "bert")
    assert (tmp_path / "bert" / "model.safetensors").is_file()
    task = make_task(tiny_bert, loss="cross_entropy", output="margin")
    for given in (tmp_path / "bert", str(tmp_path / "bert"),
                  tmp_path / "bert" / "model.safetensors"):
        (state,) = as_checkpoints(task, given)
        want = bert.state_dict()
        assert set(state) == set(want)
        assert all(torch.equal(state[k], want[k]) for k in want)


def linear_state(seed: int) -> dict[str, torch.Tensor]:
    """The state of a Linear(3, 2) built under ``seed``."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in nn.Linear(3, 2).state_dict().items()}


def linear() -> nn.Module:
    """The model of the checkpoint tests."""
    return nn.Linear(3, 2)


def test_pretrained_directories_without_transformers(tmp_path: Path) -> None:
    task = Task(make_model=linear)
    want = linear_state(4)
    torch.save(want, tmp_path / "pytorch_model.bin")
    (state,) = as_checkpoints(task, tmp_path)
    assert all(torch.equal(state[k], want[k]) for k in want)
    safetensors = pytest.importorskip("safetensors.torch")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    safetensors.save_file({"weight": want["weight"]}, str(sharded / "model-00001-of-00002.safetensors"))
    safetensors.save_file({"bias": want["bias"]}, str(sharded / "model-00002-of-00002.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "weight": "model-00001-of-00002.safetensors", "bias": "model-00002-of-00002.safetensors"}}))
    (state,) = as_checkpoints(task, sharded)
    assert all(torch.equal(state[k], want[k]) for k in want)


def test_a_directory_without_weights_names_model_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin"):
        as_checkpoints(Task(make_model=linear), tmp_path)


# ----------------------------------------------------------------- c. 'model.' prefix


def test_a_model_prefix_gets_the_strip_the_prefix_hint() -> None:
    task = Task(make_model=linear)
    prefixed = {f"model.{k}": v for k, v in linear_state(0).items()}
    with pytest.raises(ValueError, match=r"'model\.' prefix.*removeprefix\('model\.'\)"):
        as_checkpoints(task, prefixed)
    fixed = {k.removeprefix("model."): v for k, v in prefixed.items()}
    as_checkpoints(task, fixed)  # the hint's fix works
    with pytest.raises(ValueError, match=r"'module\.'"):  # the DataParallel hint is unchanged
        as_checkpoints(task, {f"module.{k}": v for k, v in linear_state(0).items()})
    with pytest.raises(ValueError) as info:  # unrelated names: no prefix hint
        as_checkpoints(task, {"other.weight": torch.zeros(2, 3)})
    assert "prefix" not in str(info.value)


# ----------------------------------------------------------------- d. labels out of range


class DictNet(nn.Module):
    """A classifier taking keyword inputs (and ignoring labels), returning a ModelOutput-like
    object."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 10)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor | None = None) -> FakeOutput:
        """Logits for 10 classes."""
        return FakeOutput(self.lin(feats))


@pytest.mark.parametrize(("bad", "row"), [(12, 4), (-1, 1), (10, 0)])
def test_a_label_out_of_range_names_its_example(bad: int, row: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen)
    y = torch.tensor([1, 2, 3, 4, 5, 6])
    y[row] = bad
    pattern = rf"label {bad} of example {row} .*10 classes"
    with pytest.raises(ValueError, match=pattern):  # tensor targets
        check_task(Task(make_model=lambda: nn.Linear(3, 10)), ArrayDataset(x, y))
    with pytest.raises(ValueError, match=pattern):  # a dict batch, labels under 'labels'
        check_task(Task(make_model=DictNet), ArrayDataset({"feats": x, "labels": y}))


@pytest.mark.parametrize(("bad", "row"), [(12, 5), (-1, 0)])
def test_bert_label_out_of_range_names_its_example(bert: nn.Module, bad: int, row: int) -> None:
    """Row 5 lies beyond check_task's probe; at row 0 the model's own loss fails first."""
    batch = bert_batch(8, 5)
    batch["labels"][row] = bad
    task = make_task(tiny_bert, loss="cross_entropy", output="margin", name="bert")
    with pytest.raises(ValueError, match=rf"label {bad} of example {row} .*{CLASSES} classes"):
        check_task(task, ArrayDataset(batch))


# ----------------------------------------------------------------- e. TracIn through attribute()


def test_tracin_through_attribute_needs_no_val_and_warns_without_learning_rates() -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen), torch.randint(0, 2, (8,), generator=gen)
    xt, yt = torch.randn(3, 3, generator=gen), torch.randint(0, 2, (3,), generator=gen)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    task = make_task(nn.Linear(3, 2), loss="cross_entropy", output="margin")
    with pytest.warns(UserWarning, match=r"learning_rates="):
        unweighted = attribute(task, (x, y), (xt, yt), checkpoints=model, attributor="tracin")
    # by hand: score[j, i] = - grad margin(z'_j) . grad loss(z_i) at the one checkpoint
    def flat_grad(value: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))])
    g_out = torch.stack([flat_grad(hand_margin(model(xt[j : j + 1]), yt[j : j + 1])[0])
                         for j in range(3)])
    g_loss = torch.stack([flat_grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]))
                          for i in range(8)])
    torch.testing.assert_close(unweighted.scores, -g_out @ g_loss.T, rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weighted = attribute(task, (x, y), (xt, yt), checkpoints=model, attributor="tracin",
                             learning_rates=[0.25])
    torch.testing.assert_close(weighted.scores, 0.25 * unweighted.scores)
    with pytest.raises(ValueError, match=r"val="):  # a lambda to select needs a validation set
        attribute(task, (x, y), (xt, yt), checkpoints=model, attributor="iffim")


# ----------------------------------------------------------------- f. data_dir per setting


def sweep_raw(**first: Any) -> dict[str, Any]:
    """A spec with two entries of one setting: the first with ``first``'s keys."""
    return {"name": "dirs", "data_dir": "/top/data",
            "settings": [{"name": "digits-lr", "label": "own", **first},
                         {"name": "digits-lr", "label": "shared"}],
            "methods": [{"name": "iffim"}]}


def test_a_setting_can_have_its_own_data_dir(tmp_path: Path, monkeypatch) -> None:
    from tdatune.study import sweep as sweep_mod
    from tdatune.study.spec import spec_from_dict

    spec = spec_from_dict(sweep_raw(data_dir="/own/data"))
    own, shared = spec.setting("own"), spec.setting("shared")
    d_own, d_shared = own.definition(spec.seed, spec.data_dir), shared.definition(spec.seed,
                                                                                  spec.data_dir)
    assert d_own["data_dir"] == "/own/data"
    assert d_shared["data_dir"] == "/top/data"  # the key and value it always had
    assert set(d_shared) == {"name", "sizes", "recipe", "model", "data", "seed", "data_dir"}
    assert {**d_own, "data_dir": "/top/data"} == d_shared  # nothing else differs
    # a spec without per-setting directories defines its settings exactly as before
    plain = spec_from_dict(sweep_raw())
    assert plain.setting("own").definition(plain.seed, plain.data_dir) == d_shared
    assert spec_from_dict(spec.to_dict()).setting("own").data_dir == "/own/data"  # round trip

    seen: dict[str, Any] = {}

    def fake_build(name: str, **kw: Any) -> tuple[Any, Any, Any]:
        seen[kw["sizes"]] = kw["data_dir"]
        return None, None, None

    monkeypatch.setattr(sweep_mod, "build_setting", fake_build)  # where the data is read
    spec = spec_from_dict({**sweep_raw(data_dir="/own/data"), "settings": [
        {"name": "digits-lr", "label": "own", "data_dir": "/own/data", "sizes": [20, 5, 5]},
        {"name": "digits-lr", "label": "shared", "sizes": [30, 5, 5]}]})
    workspace = sweep_mod.Workspace(spec, tmp_path, "cpu", False, lambda *a, **k: None)
    workspace.built("own")
    workspace.built("shared")
    assert seen == {(20, 5, 5): "/own/data", (30, 5, 5): "/top/data"}
    assert workspace.setting_dir(spec.setting("own")) != workspace.setting_dir(
        spec.setting("shared"))
    with pytest.raises(ValueError, match=r"data_dir of own"):
        spec_from_dict(sweep_raw(data_dir=3))


class TiedNet(nn.Module):
    """An embedding and an output layer sharing one weight (as language models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the 5 tokens."""
        return self.out(self.emb(x))


def test_a_tied_weight_saved_once_is_filled_in(tmp_path: Path) -> None:
    torch.manual_seed(2)
    saved = TiedNet()
    state = {"emb.weight": saved.emb.weight.detach().clone()}  # save_pretrained keeps one name
    (got,) = as_checkpoints(Task(make_model=TiedNet), state)
    assert torch.equal(got["out.weight"], state["emb.weight"])
    with pytest.raises(ValueError, match=r"missing keys \['emb\.weight', 'out\.weight'\]"):  # no twin saved
        as_checkpoints(Task(make_model=TiedNet), {"other": torch.zeros(5, 3)})


def test_checkpoints_hold_what_state_dict_holds() -> None:
    """A non-persistent buffer (Hugging Face's position_ids) is rebuilt by the constructor and
    is not saved: the saved state has exactly torch's state_dict() keys, so it loads back."""
    from tdatune.models.task import model_state

    class WithPositions(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.norm = torch.nn.BatchNorm1d(2)
            self.register_buffer("position_ids", torch.arange(4), persistent=False)

    model = WithPositions()
    state = model_state(model)
    assert set(state) == set(model.state_dict())
    WithPositions().load_state_dict(state)  # strict: neither missing nor unexpected keys
