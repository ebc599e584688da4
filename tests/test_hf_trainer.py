"""The Hugging Face Trainer as a training function (tdatune.models.hf_trainer): it trains, a
seed fixes its result, one full-batch SGD step equals a gradient step computed by hand, and an
LDS ground truth retrains with it (its outputs checked against a model retrained by hand).

A tiny BertForSequenceClassification is built from a config (nothing is downloaded); the tests
are skipped without transformers and accelerate (the Trainer needs both).
"""

from __future__ import annotations

import json
import pickle
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

try:
    import accelerate  # noqa: F401
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - CI installs both with the test extra
    pytest.skip(f"the Hugging Face Trainer needs transformers and accelerate ({exc})",
                allow_module_level=True)

from tdatune.data.base import ArrayDataset
from tdatune.evaluate.groundtruth import GroundTruthConfig, build_ground_truth
from tdatune.models import hf_trainer_function
from tdatune.models.hf_trainer import TrainerExamples, train_with_trainer
from tdatune.models.task import Task, make_task
from tdatune.models.training import TrainFunction

N, T, VOCAB = 64, 8, 20


def tiny_bert(dropout: float = 0.0) -> nn.Module:
    """One layer, hidden 16, two heads, two labels."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
                        num_labels=2, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)


def tokens(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Token ids whose label is whether the first token is in the lower half of the vocabulary
    (learnable), every other example padded after six tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=gen)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 0] < VOCAB // 2).long()}


def bert_task(dropout: float = 0.0) -> Task:
    return make_task(partial(tiny_bert, dropout), loss="cross_entropy", output="margin",
                     name="tiny-bert")


def mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the model's logits, computed here (not by the model's loss)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"])


def loaded(task: Task, state: dict[str, torch.Tensor]) -> nn.Module:
    model = task.make_model()
    model.load_state_dict(state)
    return model.eval()


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


TRAINING = {"learning_rate": 1e-2, "num_train_epochs": 2, "per_device_train_batch_size": 16}


def test_trains_and_a_seed_fixes_the_result() -> None:
    task = bert_task(dropout=0.1)  # dropout: the seed must fix its masks too
    data = ArrayDataset(tokens(N, 0))
    training = hf_trainer_function(task, **TRAINING)
    first = training.run(task, data, seed=3)
    again = training.run(task, data, seed=3)
    other_seed = training.run(task, data, seed=4)
    other_data = training.run(task, data, seed=3, index=torch.arange(N) < N // 2)

    batch = tokens(N, 0)
    torch.manual_seed(3)
    initial = task.make_model().eval()
    with torch.no_grad():
        before = float(mean_loss(initial, batch))
        after = float(mean_loss(loaded(task, first.state), batch))
    assert after < 0.9 * before, (before, after)
    assert set(first.state) == set(initial.state_dict())  # persistent entries only
    assert not differs(first.state, again.state)
    assert differs(first.state, other_seed.state)
    assert differs(first.state, other_data.state)
    assert first.history[0]["train_loss"] > 0


def test_one_full_batch_sgd_step_is_one_gradient_step_by_hand() -> None:
    """SGD without momentum or decay, constant rate, one epoch of one batch of all examples:
    the Trainer's result is theta_0 - lr * grad(mean loss)(theta_0), theta_0 from the seed."""
    task, lr, seed = bert_task(), 0.5, 7
    batch = tokens(N, 1)
    training = hf_trainer_function(
        task, optim="sgd", learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, num_train_epochs=1, per_device_train_batch_size=N)
    state = training.run(task, ArrayDataset(batch), seed=seed).state

    torch.manual_seed(seed)
    model = task.make_model().train()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(mean_loss(model, batch), list(params.values()))
    moved = 0
    for (name, p), g in zip(params.items(), grads, strict=True):
        expected = p.detach() - lr * g
        torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.allclose(expected, p.detach(), rtol=1e-5, atol=1e-6))
    assert moved > len(params) // 2  # the step is large enough to tell trained from initial


def test_dict_inputs_with_separate_labels_train_the_same() -> None:
    task = bert_task()
    batch = tokens(32, 2)
    whole = ArrayDataset(batch)
    split = ArrayDataset({k: v for k, v in batch.items() if k != "labels"}, batch["labels"])
    assert sorted(TrainerExamples(split)[5]) == ["attention_mask", "input_ids", "labels"]
    assert torch.equal(TrainerExamples(split)[5]["labels"], batch["labels"][5])
    assert sorted(TrainerExamples(ArrayDataset(batch["input_ids"], batch["labels"]))[0]) == [
        "input_ids", "labels"]
    with pytest.raises(ValueError, match="dict"):
        TrainerExamples(ArrayDataset((batch["input_ids"], batch["attention_mask"]),
                                     batch["labels"]))
    training = hf_trainer_function(task, **TRAINING)
    assert not differs(training.run(task, whole, 0).state, training.run(task, split, 0).state)


def test_options_are_checked_recorded_and_the_function_pickles() -> None:
    task = bert_task()
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        hf_trainer_function(task, learning_rte=1e-3)
    for reserved in ("seed", "data_seed", "output_dir"):
        with pytest.raises(ValueError, match=reserved):
            hf_trainer_function(task, **{reserved: 1})
    training = hf_trainer_function(task, weight_decay=0.01, **TRAINING)
    record = training.to_dict()
    assert record["options"] == {"weight_decay": 0.01, **TRAINING}
    assert record["train_function"].startswith("tdatune.models.hf_trainer:train_with_trainer")
    assert "tiny_bert" in record["train_function"]
    assert training.weight_decay == 0.01
    # show_progress is display only: the same record, so results are shared
    assert hf_trainer_function(task, show_progress=True, **TRAINING).to_dict() == \
        hf_trainer_function(task, **TRAINING).to_dict()
    copy = pickle.loads(pickle.dumps(training))  # what the process and Ray runners send
    assert isinstance(copy, TrainFunction) and copy.to_dict() == record
    data = ArrayDataset(tokens(16, 3))
    assert not differs(copy.run(task, data, 1).state, training.run(task, data, 1).state)


def test_ground_truth_retrains_with_the_trainer(tmp_path) -> None:
    task = bert_task()
    train, explained = ArrayDataset(tokens(N, 0)), ArrayDataset(tokens(2, 5))
    training = hf_trainer_function(task, **TRAINING)
    config = GroundTruthConfig(n_subsets=4, alpha=0.5, train_seed=11)
    out = tmp_path / "gt"
    gt = build_ground_truth(task, training, train, explained, config, out,
                            backend="sequential", show_progress=False)

    assert gt.outputs.shape == (4, 1, 2) and np.isfinite(gt.outputs).all()
    assert sorted(p.name for p in (out / "models").glob("m*.npy")) == [
        f"m{m:04d}_s0.npy" for m in range(4)]
    for name in ("manifest.json", "masks.npy", "outputs.npy", "train_function_check.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["options"] == TRAINING
    assert manifest["recipe"]["train_function"] == training.to_dict()["train_function"]
    assert len({tuple(row) for row in gt.outputs[:, 0].round(6)}) == 4  # subsets differ

    # Model 2 retrained here from its mask and seed: the margin log p_y / (1 - p_y) of two
    # classes is the difference of the logits.
    m = 2
    mask = gt.masks[m]
    assert int(mask.sum()) == N // 2
    state = train_with_trainer(train.subset(mask), config.model_seed(m, 0),
                               make_model=task.make_model, **TRAINING).state
    batch = tokens(2, 5)
    with torch.no_grad():
        logits = loaded(task, state)(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits.double()
    y = batch["labels"]
    margin = logits[torch.arange(2), y] - logits[torch.arange(2), 1 - y]
    np.testing.assert_allclose(gt.outputs[m, 0], margin.numpy(), rtol=1e-4, atol=1e-5)

    # Other options are another ground truth: refused, naming the option.
    other = hf_trainer_function(task, **{**TRAINING, "learning_rate": 2e-2})
    with pytest.raises(ValueError, match=r"recipe\.options\.learning_rate"):
        build_ground_truth(task, other, train, explained, config, out, backend="sequential",
                           show_progress=False)
