"""The command line as a user runs it: the demo end to end, settings listing, errors."""

from __future__ import annotations

import json

from tdatune.cli import main


def test_demo_writes_summary_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--subsets", "12", "--grid-points", "15", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("lambda_selected", "lds_selected", "lambda_best", "lds_best", "lds_curve",
                "baselines", "n_train", "n_subsets", "seconds"):
        assert key in summary
    assert summary["n_subsets"] == 12 and summary["n_train"] == 1000
    assert len(summary["lds_curve"]) == 15 and len(summary["lds_curve"][0]) == 3
    assert (out / "lambda_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
