"""Per-example gradients from layer hooks against a loop of single-example backward passes
written here with plain autograd, on every layer kind the hooks cover, on the leftovers they
hand to vmap or to the loop, and on Hugging Face BERT, GPT-2 and ResNet models built from
configs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdatune.data.base import ArrayDataset
from tdatune.features.gradients import GradientSource, per_example_grads
from tdatune.models.task import Task, make_task


def loop_grads(model: nn.Module, call: Any, fn: Any, x: Any, y: Any, n: int) -> torch.Tensor:
    """Row i: the gradient of fn(call(model, x_i), y_i) w.r.t. every parameter, example alone."""
    params = list(dict(model.named_parameters()).values())
    rows = []
    for i in range(n):
        xi = {k: v[i : i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i : i + 1]
        yi = {k: v[i : i + 1] for k, v in y.items()} if isinstance(y, dict) else y[i : i + 1]
        value = fn(call(model, xi), yi)[0]
        gs = torch.autograd.grad(value, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for g, p in zip(gs, params, strict=True)]))
    return torch.stack(rows)


def plain_call(model: nn.Module, x: Any) -> Any:
    return model(**x) if isinstance(x, dict) else model(x)


def check(model: nn.Module, x: Any, y: Any, *, mode: str = "hooks", leftover: int = 0,
          loss: Any = None, chunk_size: int = 5) -> GradientSource:
    """Hooked per-example gradients of every parameter equal the single-example loop."""
    loss = loss or (lambda out, t: F.cross_entropy(getattr(out, "logits", out), t,
                                                   reduction="none"))
    task = Task(make_model=lambda: model, loss_fn=loss)
    model.eval()
    data = ArrayDataset(x, y)
    params = dict(model.named_parameters())
    got = per_example_grads(task, model, params, data, chunk_size=chunk_size)
    want = loop_grads(model, plain_call, loss, x, y, len(data))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    source = GradientSource(task, model, params, probe=data)
    assert (source.mode, len(source.plan.leftover)) == (mode, leftover), source.reason
    return source


# ------------------------------------------------------------------- layer kinds


class SeqNet(nn.Module):
    """Tokens through an embedding (padding index 0), positions broadcast over the batch,
    a linear layer on [B, T, D] with and without bias, a LayerNorm and an RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 6, padding_idx=0)
        self.pos = nn.Embedding(7, 6)
        self.fc = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = self.pos(torch.arange(ids.shape[1])[None])  # [1, T, D]
        h = torch.tanh(self.fc(self.tok(ids) + pos))
        return self.head(self.rms(self.ln(h))).mean(1)


def test_embedding_linear_on_tokens_and_norms():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (9, 7))
    ids[::3, 4:] = 0  # padding
    source = check(SeqNet(), ids, torch.randint(0, 3, (9,)))
    kinds = {c.path: c.rule.kind for c in source.plan.layers}
    assert kinds == {"tok": "embedding", "pos": "embedding", "fc": "linear", "ln": "norm",
                     "rms": "norm", "head": "linear"}


class ConvNet(nn.Module):
    """Conv2d with stride, padding, dilation and 'same' padding; BatchNorm2d and GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding="same", dilation=2, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(self.gn(self.c2(h)))
        return self.fc(h.flatten(1))


def test_convolutions_and_batch_and_group_norms():
    torch.manual_seed(1)
    model = ConvNet()
    with torch.no_grad():  # running statistics that are not the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    check(model, torch.randn(8, 2, 8, 8), torch.randint(0, 3, (8,)))


class Reused(nn.Module):
    """One linear layer called twice, and an output layer tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 5)
        self.mix = nn.Linear(5, 5)
        self.out = nn.Linear(5, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = self.mix(torch.tanh(self.mix(h)))
        return self.out(h).mean(1)


def test_a_layer_called_twice_and_tied_weights_sum_their_contributions():
    torch.manual_seed(2)
    source = check(Reused(), torch.randint(0, 10, (6, 4)), torch.randint(0, 10, (6,)))
    shared = {c.path for c in source.plan.layers if c.shared}
    assert shared == {"emb", "out"}


class WithRawParameter(nn.Module):
    """A raw nn.Parameter (a learned scale) the hooks do not cover."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def test_a_raw_parameter_is_a_leftover_taken_by_vmap():
    torch.manual_seed(3)
    check(WithRawParameter(), torch.randn(7, 4), torch.randint(0, 3, (7,)), leftover=1)


class NoVmap(WithRawParameter):
    """Python control flow on a tensor's value: cannot run under vmap."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x) * self.scale
        return out if bool((x.abs().sum() > -1).item()) else -out


def test_a_model_vmap_cannot_run_gives_its_leftovers_by_single_example_passes(capfd):
    torch.manual_seed(4)
    check(NoVmap(), torch.randn(7, 4), torch.randint(0, 3, (7,)), leftover=1)
    assert "one example at a time" in capfd.readouterr().err


class TwoLayers(nn.Module):
    """Two linear layers, a and b; subclasses say what runs between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)


class InPlace(TwoLayers):
    """A layer's output changed in place (the hooks keep the original, the model gets a copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.mul_(2.0)
        return self.b(torch.tanh(h))


def test_an_output_modified_in_place_is_handed_on_as_a_copy():
    torch.manual_seed(5)
    source = check(InPlace(), torch.randn(6, 4), torch.randint(0, 3, (6,)))
    assert source.plan.copied == {"a"}


class Coupled(TwoLayers):
    """Batch statistics in the forward pass couple the examples of a batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h - h.mean(0, keepdim=True))


def test_a_model_coupling_its_examples_falls_back_to_vmap():
    torch.manual_seed(6)
    source = check(Coupled(), torch.randn(6, 4), torch.randint(0, 3, (6,)), mode="vmap")
    assert "differ" in source.reason


# ------------------------------------------------------------------- Hugging Face

transformers = pytest.importorskip("transformers")


def hf_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits, y, reduction="none")


def lm_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                           reduction="none").view(y.shape[0], -1).mean(1)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_bert_from_a_config_with_padding_runs_its_own_forward():
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=24,
                                     max_position_embeddings=12, num_labels=3)
    torch.manual_seed(7)
    model = transformers.BertForSequenceClassification(config)
    mask = torch.ones(6, 10, dtype=torch.long)
    mask[::2, 6:] = 0
    x = {"input_ids": torch.randint(0, 30, (6, 10)), "attention_mask": mask}
    check(model, x, torch.randint(0, 3, (6,)), loss=hf_loss, chunk_size=4)


def test_gpt2_from_a_config_conv1d_and_tied_head():
    config = transformers.GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=1,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(8)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 40, (5, 9))
    source = check(model, {"input_ids": ids}, ids, loss=lm_loss, chunk_size=3)
    assert "conv1d" in {c.rule.kind for c in source.plan.layers}


def test_resnet_from_a_config():
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                       depths=[1, 1], layer_type="basic", num_labels=3)
    torch.manual_seed(9)
    model = transformers.ResNetForImageClassification(config)
    x = {"pixel_values": torch.randn(5, 3, 16, 16)}
    source = check(model, x, torch.randint(0, 3, (5,)), loss=hf_loss, chunk_size=3)
    assert {c.rule.kind for c in source.plan.layers} == {"conv2d", "norm", "linear"}


def test_a_hugging_face_task_needs_no_forward():
    """make_task with a BERT: model(**x) under the hooks, labels left out of x."""
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=24,
                                     max_position_embeddings=12, num_labels=2)
    torch.manual_seed(10)
    model = transformers.BertForSequenceClassification(config).eval()
    task = make_task(lambda: model, loss="cross_entropy", output="margin", name="bert")
    batch = {"input_ids": torch.randint(0, 30, (4, 8)),
             "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,))}
    source = GradientSource(task, model, dict(model.named_parameters()),
                            probe=ArrayDataset(batch))
    assert source.mode == "hooks" and source.plan.leftover == []


def _gpt_lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), y[:, 1:].reshape(-1),
                           reduction="none").view(y.shape[0], -1).mean(1)


@pytest.mark.parametrize("length,chunk", [(6, 6), (4, 5)])
def test_positions_without_a_batch_dimension(length, chunk):
    """The project's GPT embeds positions [T] with no batch dimension: read once on the probe
    and expanded per example. A chunk of T examples is not mistaken for T positions
    (6, 6); a probe of T examples reads positions as batched, the check against single
    passes catches it and the gradients stay right (4, 5)."""
    from tdatune.models.gpt import GPT

    torch.manual_seed(12)
    model = GPT(vocab_size=13, block_len=8, d_model=8, n_layer=1, n_head=2, tie_head=True)
    ids = torch.randint(0, 13, (12, length))
    source = check(model, ids, ids, loss=_gpt_lm_loss, chunk_size=chunk,
                   mode="hooks" if length != 4 else "vmap")
    if length != 4:
        assert source.plan.layouts["pos_emb"] == "shared"
