"""The command line as a user runs it: the demo end to end, settings listing, errors."""

from __future__ import annotations

import contextlib
import json
import re

import pytest

from tdatune.cli import main


def test_demo_writes_summary_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--subsets", "12", "--grid-points", "15", "--quiet"]) == 0
    summary = json.loads((out / "iffim" / "summary.json").read_text())
    for key in ("lambda_selected", "lds_selected", "lambda_best", "lds_best", "lds_curve",
                "baselines", "n_train", "n_subsets", "seconds"):
        assert key in summary
    assert summary["n_subsets"] == 12 and summary["n_train"] == 1000
    assert len(summary["lds_curve"]) == 15 and len(summary["lds_curve"][0]) == 3
    assert (out / "iffim" / "lambda_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the selected lambda is far better than no damping at all, on real retraining
    assert summary["lds_selected"] > summary["lds_smallest_lambda"] + 0.2
    text = capsys.readouterr().out
    assert "surrogate xi" in text and "grid best" in text
    # a rerun reuses checkpoints and ground truth (no models directory rewritten)
    stamp = (out / "groundtruth" / "outputs.npy").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--subsets", "12", "--grid-points", "15", "--quiet"]) == 0
    assert (out / "groundtruth" / "outputs.npy").stat().st_mtime_ns == stamp


def test_demo_with_changed_configuration_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--subsets", "4", "--grid-points", "5", "--quiet"]) == 0
    assert main(["demo", "--out", str(out), "--subsets", "5", "--grid-points", "5", "--quiet"]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_bad_threshold_is_a_clear_cli_error(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path), "--subsets", "3", "--threshold", "1.5", "--quiet"])
    assert code == 2
    assert "threshold" in capsys.readouterr().err


def test_settings_lists_digits(capsys):
    assert main(["settings"]) == 0
    assert "digits-lr" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["lambda", "digits-lr", "--attributor", "foo"], "invalid choice: 'foo'"),
    (["lambda", "digits-lr", "--params", '{"proj_dimm": 64}'], "unknown hyperparameter.*proj_dimm"),
    (["lambda", "digits-lr", "--params", "{proj_dim: 64}"], "--params .* is not valid JSON"),
    (["lambda", "digits-lr", "--params", "[64]"], "--params must be a JSON object"),
    (["lambda", "digits-lr", "--attributor", "trak", "--params", '{"proj_dim": 0}'], "proj_dim"),
    (["lambda", "digits-lr", "--sizes", "100,0,20"], "validation split"),
    (["lambda", "digits-lr", "--subsets", "1"], "n_subsets"),
    (["lambda", "digits-lr", "--model-opt", "widht=3"], "unknown option.*widht"),
    (["lambda", "nowhere"], "unknown setting 'nowhere'"),
    (["groundtruth", "digits-lr", "--sizes", "100,0,0"], "test split"),
    (["groundtruth", "digits-lr", "--sizes", "100 0 0"], "three integers"),
    (["groundtruth", "digits-lr", "--alpha", "1.5"], "alpha"),
    (["groundtruth", "digits-lr", "--epochs", "0"], "--epochs must be >= 1"),
    (["groundtruth", "digits-lr", "--backend", "process", "--workers", "0"], "--workers"),
    (["train", "digits-lr", "--sizes", "10,0,5"], "validation split"),
    (["train", "cifar2-resnet9", "--model-opt", "depth=3"], "unknown option.*depth.*width"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, argv, match):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) if "invalid choice" in match else contextlib.nullcontext():
        code = main([*argv, "--out", str(out), "--quiet"])
        assert code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not out.exists() or not any(out.rglob("*.pt")), "work started before the refusal"


def test_lambda_studies_of_two_attributors_share_one_run_directory(tmp_path):
    out = tmp_path / "run"
    common = ["--out", str(out), "--subsets", "4", "--grid-points", "5", "--quiet",
              "--sizes", "150,40,30", "--epochs", "2"]
    assert main(["lambda", "digits-lr", *common]) == 0
    stamp = (out / "groundtruth" / "outputs.npy").stat().st_mtime_ns
    assert main(["lambda", "digits-lr", "--attributor", "trak", "--params", '{"proj_dim": 64}',
                 *common]) == 0
    iffim = json.loads((out / "iffim" / "summary.json").read_text())
    (trak_dir,) = out.glob("trak-*")
    trak = json.loads((trak_dir / "summary.json").read_text())
    assert iffim["attributor"] == "iffim" and trak["attributor"] == "trak"
    assert trak["attributor_params"]["proj_dim"] == 64
    assert (out / "groundtruth" / "outputs.npy").stat().st_mtime_ns == stamp  # reused


def test_a_rerun_says_resuming_or_reusing_not_training(tmp_path):
    from tdatune.models.training import TrainRecipe
    from tdatune.study.prepare import _training_message

    recipe = TrainRecipe(epochs=3)
    ckpt = tmp_path / "checkpoints"
    assert _training_message("x", 10, "src", recipe, ckpt).startswith("training x on 10")
    ckpt.mkdir()
    (ckpt / "epoch_000.pt").write_bytes(b"")
    assert "resuming the training of x after epoch 1 of 3" in _training_message("x", 10, "s", recipe, ckpt)
    for e in (1, 2):
        (ckpt / f"epoch_{e:03d}.pt").write_bytes(b"")
    assert _training_message("x", 10, "s", recipe, ckpt).startswith("reusing the trained x")
