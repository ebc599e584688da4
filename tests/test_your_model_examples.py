"""examples/your_model.py end to end at a small size, and the CLI on a user task."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example(one_torch_thread):
    sys.path.insert(0, str(ROOT))
    try:
        import examples.your_model as module
        yield module
    finally:
        sys.path.remove(str(ROOT))


def _check(outcome, n_train: int, n_test: int) -> None:
    assert outcome.scores_shape == (n_test, n_train)
    assert outcome.lam > 0 and math.isfinite(outcome.lam)
    assert outcome.status in ("crossed", "below-grid", "above-grid", "spectrum")
    assert outcome.n_dropped == 0
    assert -1 <= outcome.lds <= 1


def test_regression_example_end_to_end(example, tmp_path):
    outcome = example.run_regression(str(tmp_path), n_subsets=8)
    _check(outcome, 200, 60)
    # MSE regression with its own loop: attribution tracks retraining clearly
    assert outcome.lds > 0.2


def test_transformer_example_end_to_end(example, tmp_path):
    outcome = example.run_transformer(str(tmp_path), n_subsets=6)
    _check(outcome, 96, 24)


def test_transformer_example_trains_on_dict_batches(example):
    """The recipe's minibatch loop on dict batches lowers the loss it reports."""
    from tdatune.models.training import TrainRecipe, train_model

    setting = example.transformer_setting()
    splits, task = setting.build()
    recipe = TrainRecipe(optimizer="adam", epochs=4, lr=5e-3, batch_size=16)
    history = train_model(task, splits.train, recipe, seed=0).history
    assert history[-1]["train_objective"] < history[0]["train_objective"]


def test_get_setting_accepts_a_task_reference(example, monkeypatch):
    from tdatune.settings import get_setting
    from tdatune.settings.registry import SETTINGS

    monkeypatch.chdir(ROOT)
    setting = get_setting("examples.your_model:regression_setting")
    assert setting.name == "diabetes-mlp" and setting.name not in SETTINGS
    assert get_setting("examples.your_model:regression_setting") is setting
    splits, task = setting.build(sizes=(50, 10, 10))
    assert len(splits.train) == 50 and task.output == "prediction"
    with pytest.raises(ValueError, match="cannot import module"):
        get_setting("no_such_package.mod:fn")
    with pytest.raises(ValueError, match=r"must be \(or return\) a tdatune Setting"):
        get_setting("examples.your_model:regression_net")


def test_cli_groundtruth_and_train_on_a_user_task(example, tmp_path, monkeypatch):
    from tdatune.cli import main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "gt"
    assert main(["groundtruth", "--task", "examples.your_model:regression_setting",
                 "--out", str(out), "--subsets", "3", "--sizes", "40,10,10",
                 "--backend", "sequential", "--quiet"]) == 0
    manifest = json.loads((out / "groundtruth" / "manifest.json").read_text())
    assert manifest["recipe"]["train_function"].endswith("train_regression")
    assert manifest["task"]["output"] == "prediction"
    assert len(list((out / "groundtruth" / "models").glob("m*.npy"))) == 3
    assert len(list((out / "checkpoints").glob("epoch_*.pt"))) == 3  # the loop's 3 states
    # a rerun reuses the saved training and ground truth
    assert main(["groundtruth", "--task", "examples.your_model:regression_setting",
                 "--out", str(out), "--subsets", "3", "--sizes", "40,10,10",
                 "--backend", "sequential", "--quiet"]) == 0
    train_out = tmp_path / "train"
    assert main(["train", "--task", "examples.your_model:regression_setting",
                 "--out", str(train_out), "--sizes", "40,10,10"]) == 0
    run = json.loads((train_out / "run.json").read_text())
    assert run["recipe"]["train_function"].endswith("train_regression")
    assert math.isfinite(run["test_loss"])
    assert main(["train", "--task", "no_colon", "--out", str(train_out)]) == 2


def test_cli_lambda_study_on_a_user_task(example, tmp_path, monkeypatch):
    from tdatune.cli import main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "lambda"
    assert main(["lambda", "--task", "examples.your_model:regression_setting", "--out", str(out),
                 "--subsets", "4", "--grid-points", "9", "--backend", "sequential",
                 "--quiet"]) == 0
    summary = json.loads((out / "iffim" / "summary.json").read_text())
    assert summary["setting"] == "diabetes-mlp"
    assert summary["lambda_selected"] > 0 and len(summary["lds_curve"]) == 9
    assert (out / "iffim" / "lambda_curve.png").exists()


def test_cli_lambda_on_a_padded_hugging_face_bert_with_its_own_forward(tmp_path, monkeypatch):
    """examples.bert_classifier:small_padded_bert_setting: a BERT called as model(**batch)
    with a padded 2-D attention mask, no forward=, through `tdatune lambda`; its per-example
    gradients are the single-example passes' (checked on a few examples here)."""
    pytest.importorskip("transformers")
    import torch

    from tdatune.cli import main
    from tdatune.features.gradients import per_example_grads
    from tdatune.models.training import init_model
    from tdatune.settings import get_setting

    monkeypatch.chdir(ROOT)
    ref = "examples.bert_classifier:small_padded_bert_setting"
    splits, task = get_setting(ref).build()
    assert task.forward is None and bool((splits.train.inputs["attention_mask"] == 0).any())
    model = init_model(task, 0)
    params = dict(model.named_parameters())
    data = splits.train.slice(0, 5)
    got = per_example_grads(task, model, params, data, chunk_size=5)
    for i in (0, 3):
        item = {k: v[i : i + 1] for k, v in data.inputs.items()}
        loss = torch.nn.functional.cross_entropy(model(**item).logits, item["labels"])
        want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    out = tmp_path / "bert"
    assert main(["lambda", "--task", ref, "--out", str(out), "--subsets", "4",
                 "--grid-points", "5", "--backend", "sequential", "--quiet"]) == 0
    summary = json.loads((out / "iffim" / "summary.json").read_text())
    assert summary["setting"] == "kjv-bert-padded" and summary["lambda_selected"] > 0
