"""Every built-in setting end to end at a tiny size on CPU: build, train with a checkpoint per
epoch, per-example gradients, LDS ground truth from 3 retrained subsets; plus the CLI."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from data_writers import write_mnist_dir
from tdatune.cli import main
from tdatune.evaluate.groundtruth import GroundTruthConfig, build_ground_truth
from tdatune.features.gradients import num_params, per_example_grads
from tdatune.models.training import init_model, load_checkpoints, train_model, trainable
from tdatune.settings.registry import all_settings, get_setting

ALL = ["digits-lr", "digits-mlp", "mnist-lr", "mnist-mlp", "cifar2-resnet9", "text-gpt2",
       "music-transformer"]


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """Tiny Fashion-MNIST-format IDX files, so the cifar2 stand-in needs no Debian package."""
    directory = tmp_path_factory.mktemp("fashion")
    write_mnist_dir(directory, n_train=600, n_test=200, seed=5)
    return directory


@pytest.fixture(scope="module")
def music_cache(tmp_path_factory):
    """Chorale conversions cached once for this module."""
    return tmp_path_factory.mktemp("music-cache")


def test_registry_lists_every_setting():
    names = [s.name for s in all_settings()]
    assert names == ALL
    for s in all_settings():
        assert s.data_source in ("real", "stand-in") and min(s.sizes) > 0
    assert get_setting("mnist-lr").sizes == (5000, 500, 500)
    with pytest.raises(ValueError, match="choose one of"):
        get_setting("imagenet")


@pytest.mark.parametrize("name", ALL)
def test_setting_end_to_end_tiny(name, tmp_path, fashion_dir, music_cache):
    setting = get_setting(name)
    data_dir = fashion_dir if name == "cifar2-resnet9" else None
    load_opts = {"cache": music_cache} if name == "music-transformer" else None
    splits, task = setting.build(seed=0, data_dir=data_dir, tiny=True, load_options=load_opts)
    assert splits.sizes() == dict(zip(("train", "val", "test"), setting.tiny_sizes, strict=True))
    if setting.data_source == "stand-in":
        assert splits.source.startswith("stand-in")
    if setting.sequence:
        assert task.output == "negative_loss"
        assert splits.info["unigram_loss_val"] > 0
    pickle.loads(pickle.dumps(task))  # ground truth ships tasks to other processes

    recipe = setting.tiny_recipe()
    result = train_model(task, splits.train, recipe, seed=0, checkpoint_dir=tmp_path / "ckpt")
    assert len(load_checkpoints(tmp_path / "ckpt")) == recipe.epochs
    again = train_model(task, splits.train, recipe, seed=0)
    for key, value in result.state.items():
        assert torch.equal(value, again.state[key]), f"training is not deterministic in {key}"

    model = init_model(task, 0)
    model.load_state_dict(result.state)
    params = trainable(model, result.state)
    grads = per_example_grads(task, model, params, splits.test)
    assert grads.shape == (len(splits.test), num_params(params))
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0

    truth = build_ground_truth(task, recipe, splits.train, splits.val,
                               GroundTruthConfig(n_subsets=3, alpha=0.5), tmp_path / "gt",
                               show_progress=False)
    assert truth.outputs.shape == (3, 1, len(splits.val))
    assert np.isfinite(truth.outputs).all()


def test_cli_lists_settings(capsys):
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    for name in ALL:
        assert name in out
    assert "stand-in" in out and "5000/500/500" in out
    assert main(["settings", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["data"] for r in rows}["text-gpt2"] == "stand-in"


def test_cli_train_records_run(tmp_path, capsys, fashion_dir):
    out = tmp_path / "run"
    assert main(["train", "cifar2-resnet9", "--tiny", "--out", str(out), "--data-dir",
                 str(fashion_dir), "--model-opt", "width=2", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "stand-in" in text and "epoch   1" in text
    run = json.loads((out / "run.json").read_text())
    assert run["source"].startswith("stand-in") and run["model_options"] == {"width": 2}
    assert 0 <= run["test_accuracy"] <= 1 and len(run["history"]) == 2
    assert len(list((out / "checkpoints").glob("epoch_*.pt"))) == 2


def test_cli_train_text_saves_tokenizer_and_baseline(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "text-gpt2", "--tiny", "--out", str(out), "--epochs", "1"]) == 0
    assert "unigram" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert run["unigram_loss_val"] > 0 and run["val_loss"] > 0
    assert json.loads((out / "tokenizer.json").read_text())["type"] == "byte-bpe"


def test_cli_reports_bad_data_dir(tmp_path, capsys):
    assert main(["train", "mnist-lr", "--tiny", "--data-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err
    assert main(["train", "mnist-lr", "--sizes", "1,2", "--out", str(tmp_path / "r")]) == 2
