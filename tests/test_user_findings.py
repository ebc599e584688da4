"""Findings a new user reported, each reproduced here: labels out of range with Hugging Face
``ModelOutput``s and dict outputs, labels on the explain page for dict-batch text data,
PyTorch's batching-rule warnings for a ViT's raw parameters, and messages that did not say
enough (the split holding NaN, a ground-truth folder that cannot be created, ``lds_path``'s
return value, choosing lambda with ``calibrate_lambda``)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdatune.data.base import ArrayDataset
from tdatune.models.task import make_task
from tdatune.models.training import TrainFunction
from tdatune.study.attribute import attribute

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 3


def pairs(n: int, seed: int, features: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [n, features], labels [n] in 0..CLASSES-1) from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, features, generator=gen),
            torch.randint(0, CLASSES, (n,), generator=gen))


# ----------------------------------------------------------------- 1. labels out of range


class DictOutputNet(nn.Module):
    """A classifier returning its logits in a dict (as a ModelOutput is one)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"logits": [B, 3]}."""
        return {"logits": self.lin(x)}


class ModelOutputNet(nn.Module):
    """A classifier returning transformers' SequenceClassifierOutput."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> Any:
        """SequenceClassifierOutput(logits=[B, 3])."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.lin(x))


def never_trains(data: ArrayDataset, seed: int) -> dict[str, torch.Tensor]:
    """A training function that must not be reached: the label check comes first."""
    raise AssertionError("training started before the labels were checked")


def output_models() -> list[type[nn.Module]]:
    """The dict-output model, and the ModelOutput one when transformers is installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return [DictOutputNet]
    return [DictOutputNet, ModelOutputNet]


@pytest.mark.parametrize("net", output_models())
@pytest.mark.parametrize(("split", "row", "what"), [("train", 5, "training data"),
                                                     ("val", 4, "validation set"),
                                                     ("explained", 2, "explained examples")])
def test_label_out_of_range_with_logits_in_the_output(net: type[nn.Module], split: str, row: int,
                                                      what: str) -> None:
    data = {"train": pairs(12, 0), "val": pairs(8, 1), "explained": pairs(4, 2)}
    data[split][1][row] = 7  # beyond check_task's probe of 3 for the training data
    task = make_task(net(), loss="cross_entropy", output="margin", name="own")
    with pytest.raises(ValueError, match=rf"the {what} targets: label 7 of example {row} "
                                         rf"is out of range for a model with 3 classes"):
        attribute(task, data["train"], data["explained"], val=data["val"],
                  training=TrainFunction(never_trains))


def test_label_out_of_range_with_a_tiny_transformers_classifier() -> None:
    """A BertForSequenceClassification called on dict inputs, labels given as targets."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=6, num_labels=CLASSES)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(0, 30, (10, 6), generator=gen),
              "attention_mask": torch.ones(10, 6, dtype=torch.long)}
    labels = torch.randint(0, CLASSES, (10,), generator=gen)
    labels[8] = 7
    task = make_task(model, loss="cross_entropy", output="margin", name="bert")
    with pytest.raises(ValueError, match=r"label 7 of example 8 is out of range .*3 classes"):
        attribute(task, (inputs, labels), (inputs, labels.clamp(max=2)), lam=1e-3,
                  training=TrainFunction(never_trains))


# ----------------------------------------------------------------- 2. labels on the explain page


def card_chunks(page: str) -> list[tuple[str, str, str]]:
    """(role, title, rest of the card's HTML) for every card of the page, in order."""
    found = re.findall(r'<div class="card (explained|proponent|opponent)"><div class="title">'
                       r"([^<]*)</div>(.*?)(?=<div class=\"card |</section>)", page, flags=re.S)
    return [(role, title, rest) for role, title, rest in found]


def test_explain_page_shows_labels_of_dict_batch_text(tmp_path: Path) -> None:
    from tdatune.study.explain import explain_scores

    gen = torch.Generator().manual_seed(0)
    train_labels = [0, 2, 1, 2, 0, 1, 1, 0, 2, 1]
    explained_labels = [2, 0]

    def batch(labels: list[int]) -> ArrayDataset:
        n = len(labels)
        return ArrayDataset({"input_ids": torch.randint(1, 50, (n, 6), generator=gen),
                             "attention_mask": torch.ones(n, 6, dtype=torch.long),
                             "labels": torch.tensor(labels)})

    train, explained = batch(train_labels), batch(explained_labels)
    scores = torch.randn(2, len(train), generator=gen)
    page = explain_scores(scores, train, explained, tmp_path, k=3).read_text()
    cards = card_chunks(page)
    assert len(cards) == 2 * (1 + 3 + 3)
    explained_seen = 0
    for role, title, rest in cards:
        if role == "explained":
            want = explained_labels[explained_seen]
            explained_seen += 1
        else:
            want = train_labels[int(title.removeprefix("train #"))]
        assert f'<div class="label">class {want}</div>' in rest, (role, title, rest)


def test_explain_page_shows_regression_targets(tmp_path: Path) -> None:
    """Values data with float targets: each card shows its example's target."""
    from tdatune.study.explain import explain_scores

    x = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    y = torch.tensor([0.5, -1.25, 2.0, 3.5, -0.75])
    train = ArrayDataset(x, y)
    page = explain_scores(torch.tensor([[1.0, -2.0, 3.0, 0.5, -0.1]]), train, train.slice(0, 1),
                          tmp_path, k=2).read_text()
    wanted = {"explained example 0": "0.5", "train #2": "2", "train #0": "0.5",
              "train #1": "-1.25", "train #4": "-0.75"}
    for _, title, rest in card_chunks(page):
        assert f'<div class="label">target {wanted[title]}</div>' in rest, (title, rest)


# ----------------------------------------------------------------- 3. ViT raw parameters


def test_vit_raw_parameters_warn_once_and_stay_exact() -> None:
    transformers = pytest.importorskip("transformers")
    from tdatune.features import gradients
    from tdatune.features.gradients import per_example_grads

    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    task = make_task(model, loss="cross_entropy", output="margin", name="vit")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 1, 8, 8, generator=gen), torch.randint(0, 3, (9,), generator=gen)
    params = dict(model.named_parameters())
    gradients.SAID_BATCHING.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = per_example_grads(task, model, params, ArrayDataset(x, y), chunk_size=3)
        per_example_grads(task, model, params, ArrayDataset(x, y), chunk_size=3)  # a 2nd source
    texts = [str(w.message) for w in caught]
    assert not [t for t in texts if "batching rule" in t and "tdatune" not in t], texts
    assert len([t for t in texts if "tdatune" in t]) <= 1, texts  # once for two sources
    for i in (0, 4, 8):  # independent: one example's loss, differentiated by autograd
        loss = F.cross_entropy(model(x[i : i + 1]).logits, y[i : i + 1])
        want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    names = list(params)
    cls = names.index("vit.embeddings.cls_token")
    start = sum(params[k].numel() for k in names[:cls])
    assert float(got[:, start : start + 16].abs().sum()) > 0  # the raw parameter is there


# ----------------------------------------------------------------- 4a. NaN names its split


@pytest.mark.parametrize(("split", "where", "what"), [
    ("train", "inputs", "training data"), ("val", "inputs", "validation set"),
    ("explained", "targets", "explained examples")])
def test_nan_in_data_names_the_split(split: str, where: str, what: str) -> None:
    data = {"train": pairs(12, 0), "val": pairs(8, 1), "explained": pairs(4, 2)}
    x, y = data[split]
    if where == "inputs":
        x[3, 1] = float("nan")
    else:
        data[split] = (x, y.double())
        data[split][1][3] = float("inf")
    task = make_task(nn.Linear(4, CLASSES), loss="mse" if where == "targets" else "cross_entropy",
                     output="margin" if where == "inputs" else "loss")
    with pytest.raises(ValueError, match=rf"the {what}: {where} holds NaN or inf for example 3"):
        attribute(task, data["train"], data["explained"], val=data["val"],
                  training=TrainFunction(never_trains))


# ----------------------------------------------------------------- 4b. ground-truth folder


def quick_train(data: ArrayDataset, seed: int) -> nn.Module:
    """A few full-batch steps of a linear classifier."""
    model = nn.Linear(4, CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = data.inputs, data.targets
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_a_ground_truth_folder_that_cannot_be_created_says_so(tmp_path: Path) -> None:
    from tdatune.evaluate import GroundTruthConfig, build_ground_truth

    blocker = tmp_path / "results.txt"
    blocker.write_text("a file, not a folder")
    folder = blocker / "gt"
    task = make_task(nn.Linear(4, CLASSES), loss="cross_entropy", output="margin")
    train, explained = ArrayDataset(*pairs(12, 0)), ArrayDataset(*pairs(4, 2))
    with pytest.raises(OSError, match=rf"cannot create the ground-truth folder {re.escape(str(folder))}"
                                      rf".*{re.escape(str(blocker))} is a file"):
        build_ground_truth(task, TrainFunction(quick_train), train, explained,
                           GroundTruthConfig(n_subsets=3, alpha=0.5), folder, show_progress=False)


# ----------------------------------------------------------------- 4c / 4d. documentation


def test_lds_path_documents_what_it_returns() -> None:
    from tdatune.evaluate.lds import lds_path

    doc = lds_path.__doc__ or ""
    assert "one LDSResult per lambda" in doc, doc
    page = (ROOT / "docs" / "your_model.md").read_text()
    assert "one `LDSResult` per lambda" in page


def doc_block(fragment: str) -> str:
    """The python code block of docs/your_model.md holding ``fragment``."""
    page = (ROOT / "docs" / "your_model.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    found = [b for b in blocks if fragment in b]
    assert len(found) == 1, f"{len(found)} blocks with {fragment!r}"
    return found[0]


@pytest.mark.filterwarnings("ignore:the selected lambda")
def test_your_model_page_shows_calibrate_lambda_and_it_runs(tmp_path: Path) -> None:
    """The page's calibration block, run on the names the page's earlier blocks define
    (``result``, ``gt``, ``test``, ``as_dataset``), built small here."""
    from tdatune.data import as_dataset
    from tdatune.evaluate import GroundTruthConfig, build_ground_truth

    page = (ROOT / "docs" / "your_model.md").read_text()
    assert "calibrate_lambda(path, masks, outputs, lambdas, smoothed=True, window=None)" in page
    train, val, test = pairs(40, 0), pairs(20, 1), pairs(6, 2)
    task = make_task(nn.Linear(4, CLASSES), loss="cross_entropy", output="margin")
    torch.manual_seed(0)
    result = attribute(task, train, test, val=val, checkpoints=quick_train(as_dataset(train), 0))
    gt = build_ground_truth(task, TrainFunction(quick_train), as_dataset(train), as_dataset(test),
                            GroundTruthConfig(n_subsets=6, alpha=0.5), tmp_path / "gt",
                            show_progress=False)
    scope: dict[str, Any] = {"torch": torch, "result": result, "gt": gt, "test": test,
                             "as_dataset": as_dataset}
    exec(doc_block("calibrate_lambda("), scope)
    lambdas = torch.as_tensor(scope["lambdas"], dtype=torch.float64)
    assert float(scope["lam_calibrated"]) in lambdas.tolist()
    assert scope["lds_curve"].shape == (len(lambdas),)


def test_accuracy_reads_the_logits_of_a_model_output_and_the_labels_of_a_dict_batch():
    """A model returning a ``SequenceClassifierOutput`` on (inputs, targets) data and on whole
    dict batches: accuracy is the argmax of its logits against the labels, counted here."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    from tdatune.models.task import model_params

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 3)

        def forward(self, x=None, input_ids=None, labels=None):
            return SequenceClassifierOutput(logits=self.lin(x if x is not None else input_ids))

    torch.manual_seed(0)
    model = Wrapped()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0], [3.0, -1.0]])
    pred = model.lin(x).argmax(1)
    y = pred.clone()
    y[[1, 4]] = (pred[[1, 4]] + 1) % 3  # two wrong of five
    task = make_task(Wrapped, "cross_entropy", "margin", name="t")
    assert task.accuracy(model, model_params(model), x, y) == pytest.approx(3 / 5)
    batch = {"input_ids": x, "labels": y}
    assert task.accuracy(model, model_params(model), batch, batch) == pytest.approx(3 / 5)
