"""What makes a stored result current: every field a number depends on is part of the identity
of checkpoints, ground truths and sweep cells, a change recomputes or is refused naming the
field, and what a cell shows is read at the spec's threshold. Each test changes exactly one
thing and checks the outcome against raw files or by-hand values."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn

from sweep_specs import TINY_SETTING
from tdatune.data.base import as_dataset
from tdatune.evaluate.groundtruth import GroundTruthConfig, build_ground_truth
from tdatune.models.identity import task_identity
from tdatune.models.outputs import cross_entropy
from tdatune.models.task import Task, make_task
from tdatune.models.training import TrainFunction, TrainRecipe, train_model
from tdatune.study.report import write_report
from tdatune.study.results import load_results
from tdatune.study.sweep import load_spec, run_sweep
from tdatune.utils.atomic import atomic_write_json

BASE = '''
name = "tiny"
grid_points = 6
threshold = 0.5
thresholds = [0.4, 0.6]
''' + TINY_SETTING + '''
[[methods]]
name = "iffim"
vary = [{ lam = "spectrum" }]
'''


def _spec(tmp: Path, text: str, name: str = "s.toml"):
    (tmp / name).write_text(text)
    return load_spec(tmp / name)


def _sweep(tmp: Path, text: str, out: Path, name: str = "s.toml") -> tuple[list, list[str]]:
    said: list[str] = []
    outcome = run_sweep(_spec(tmp, text, name), out, show_progress=False, say=said.append)
    return list(outcome), said


def _raw_cell(out: Path) -> dict:
    (path,) = sorted((out / "cells").glob("*.json"))
    return json.loads(path.read_text())


def _marker_lambda(out: Path, method: str = "iffim") -> float:
    with open(out / "figures" / f"selection_{method}.csv") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("marker") == "surrogate"]
    return float(row["lam"])


@pytest.fixture(scope="module")
def base_sweep(tmp_path_factory):
    """One tiny sweep (trained setting, ground truth, one spectrum cell), copied per test."""
    root = tmp_path_factory.mktemp("identity")
    _sweep(root, BASE, root / "out")
    return root / "out"


@pytest.fixture
def out(base_sweep, tmp_path):
    dest = tmp_path / "out"
    shutil.copytree(base_sweep, dest)
    return dest


# -- threshold: the live defect ------------------------------------------------------------------

def test_the_figure_marks_the_spec_threshold_not_the_first_one(out):
    """Threshold 0.5 with thresholds [0.4, 0.6]: the marker is the 0.5 selection (not 0.4)."""
    write_report(out)
    raw = _raw_cell(out)
    by_t = {s["threshold"]: s["lambda"] for s in raw["selections"]}
    assert sorted(by_t) == [0.4, 0.5, 0.6]
    assert by_t[0.4] != by_t[0.5]
    assert _marker_lambda(out) == pytest.approx(by_t[0.5], rel=1e-12)
    env = raw["environment"]
    assert env["threads"] == torch.get_num_threads() and env["torch"] == torch.__version__
    assert f"threads {torch.get_num_threads()}" in (out / "report.md").read_text()


def test_changing_only_the_default_threshold_marks_the_new_one(out, tmp_path):
    """0.5/[0.4, 0.6] then 0.4/[0.5, 0.6]: the same thresholds computed, so the cell is reused,
    and the figure, its CSV and the report's table all show the 0.4 selection."""
    spec2 = BASE.replace("threshold = 0.5", "threshold = 0.4").replace("[0.4, 0.6]", "[0.5, 0.6]")
    _, said = _sweep(tmp_path, spec2, out, "b.toml")
    assert any("1 already done, 0 to run" in s for s in said)
    write_report(out)
    raw = _raw_cell(out)
    lam04 = next(s["lambda"] for s in raw["selections"] if s["threshold"] == 0.4)
    lam05 = next(s["lambda"] for s in raw["selections"] if s["threshold"] == 0.5)
    assert lam04 != lam05
    assert _marker_lambda(out) == pytest.approx(lam04, rel=1e-12)
    with open(out / "selection.csv") as f:
        (row,) = list(csv.DictReader(f))
    report = (out / "report.md").read_text()
    assert f"| {float(row['lam@0.4']):.3g} |" in report
    assert float(row["lam@0.4"]) == pytest.approx(lam04, rel=1e-12)


@pytest.mark.parametrize(("old", "new", "field"), [
    ("thresholds = [0.4, 0.6]", "thresholds = [0.4, 0.7]", "thresholds"),
    ("grid_points = 6", "grid_points = 7", "spectrum_grid"),
    ("n_subsets = 8", "n_subsets = 9", "groundtruth.n_subsets"),
    ('name = "tiny"', 'name = "tiny"\nseed = 3', "setting.seed"),
])
def test_a_changed_spec_field_recomputes_the_cell_naming_it(out, tmp_path, old, new, field):
    """One spec field changed: the cell is recomputed (never 'already done'), the field named,
    and the new cell answers the new question (checked in its raw file)."""
    _, said = _sweep(tmp_path, BASE.replace(old, new), out, "c.toml")
    assert any("definition changed" in s and field in s for s in said), said
    assert any("0 already done, 1 to run" in s for s in said)
    raw = _raw_cell(out)
    if field == "thresholds":
        assert [s["threshold"] for s in raw["selections"]] == [0.4, 0.5, 0.7]
    if field == "spectrum_grid":
        assert sum(r["spectrum"] for r in raw["rows"]) == 7
    if field == "groundtruth.n_subsets":
        manifests = list((out / "settings").glob("*/groundtruth-*/manifest.json"))
        assert sorted(json.loads(m.read_text())["config"]["n_subsets"] for m in manifests) == [8, 9]
    if field == "setting.seed":
        assert raw["definition"]["setting"]["seed"] == 3


def test_sizes_and_model_options_reach_the_trained_model(tmp_path):
    """A setting's sizes and model options change what is trained: the cell explains the given
    number of test examples and records the architecture of the given width (by hand:
    64 inputs, width w, 10 classes)."""
    spec = BASE.replace('name = "digits-lr"', 'name = "digits-mlp"\nmodel = { hidden = [7] }') \
        .replace("sizes = [150, 40, 30]", "sizes = [100, 20, 13]")
    (cell,), _ = _sweep(tmp_path, spec, tmp_path / "out")
    assert cell["status"] == "ok", cell.get("error")
    assert cell["n_explained"] == 13
    assert cell["definition"]["inputs"]["model"].endswith(f"{64 * 7 + 7 + 7 * 10 + 10} parameters")


# -- damaged and stale cells ----------------------------------------------------------------------

def test_a_truncated_cell_is_recomputed_and_named_by_the_report(out, tmp_path):
    """A damaged cell file is never served: the report names it, a rerun recomputes it."""
    (path,) = list((out / "cells").glob("*.json"))
    path.write_text(path.read_text()[:50])
    with pytest.raises(FileNotFoundError, match=path.name):
        write_report(out)
    _, said = _sweep(tmp_path, BASE, out, "d.toml")
    assert any("unreadable" in s for s in said)
    assert any("0 already done, 1 to run" in s for s in said)
    assert json.loads(path.read_text())["status"] == "ok"


def test_the_report_never_draws_a_stale_cell(out):
    """The spec in the directory asks for another grid than the stored cell holds: the cell is
    stale, not current."""
    spec = json.loads((out / "sweep.json").read_text())
    spec["grid_points"] = 9
    atomic_write_json(out / "sweep.json", spec)
    with pytest.raises(FileNotFoundError, match="no finished cell"):
        load_results(out)


def test_a_changed_model_makes_the_cell_stale_for_the_report(out):
    """The setting's recorded identity (what the last sweep resolved) differs from the one the
    cell was computed from: the report does not show it."""
    (ident,) = list((out / "settings").glob("*/identity.json"))
    data = json.loads(ident.read_text())
    data["task"]["architecture"]["fingerprint"] = "0" * 16
    atomic_write_json(ident, data)
    with pytest.raises(FileNotFoundError):
        load_results(out)


def test_a_format_2_cell_is_read_by_the_report_and_recomputed_by_a_sweep(out, tmp_path):
    """A cell written before inputs were recorded (format 2, no inputs, a stored surrogate) is
    read by the report (marked legacy); a sweep cannot check the model it came from, so it
    recomputes it and writes today's format."""
    (path,) = list((out / "cells").glob("*.json"))
    raw = json.loads(path.read_text())
    raw["definition"]["format"] = 2
    del raw["definition"]["inputs"]
    raw["fingerprint"] = "legacy"
    raw["surrogate"] = raw["selections"][0]  # what the threshold in force then selected
    atomic_write_json(path, raw)
    results = load_results(out)
    assert [c["cell_id"] for c in results.cells] == [raw["cell_id"]]
    assert results.legacy == [raw["cell_id"]]
    assert results.cells[0]["surrogate"]["threshold"] == 0.5  # picked now, not the stored one
    _, said = _sweep(tmp_path, BASE, out, "e.toml")
    assert any("0 already done, 1 to run" in s for s in said)
    assert any("computed by cell format 2" in s and "recomputing" in s for s in said)
    rewritten = json.loads(path.read_text())
    assert rewritten["definition"]["format"] == 3 and "inputs" in rewritten["definition"]
    assert load_results(out).legacy == []


# -- ground truth and checkpoints: the task's identity ---------------------------------------------

def _data(n: int, seed: int, d: int = 4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    return as_dataset(x, (x[:, 0] > 0).long())


def linear() -> nn.Module:
    return nn.Linear(4, 2)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def mlp_tanh() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def hinge(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Another per-example loss with the same signature as cross-entropy."""
    margin = outputs.gather(1, y[:, None])[:, 0] - outputs.max(1).values
    return torch.relu(1 - margin)


RECIPE = TrainRecipe(optimizer="sgd", epochs=1, lr=0.1, batch_size=8)
CONFIG = GroundTruthConfig(n_subsets=3, alpha=0.5)


def _gt(task: Task, directory: Path, explained_seed: int = 1):
    return build_ground_truth(task, RECIPE, _data(16, 0), _data(5, explained_seed), CONFIG,
                              directory, backend="sequential", show_progress=False)


@pytest.mark.parametrize(("second", "field"), [
    (make_task(mlp, "cross_entropy", "margin", name="t"), "task.architecture"),
    (make_task(mlp_tanh, "cross_entropy", "margin", name="t"), "task.architecture.fingerprint"),
    (make_task(linear, hinge, "margin", name="t"), "task.loss_fn"),
    (make_task(linear, "cross_entropy", "probability", name="t"), "task.output"),
])
def test_a_ground_truth_of_another_task_is_refused_naming_the_field(tmp_path, second, field):
    """Same task name, one thing changed (architecture, activation only, loss, output): the
    stored ground truth is refused and the changed field named."""
    first = make_task(mlp if field == "task.architecture.fingerprint" else linear,
                      "cross_entropy", "margin", name="t")
    _gt(first, tmp_path)
    with pytest.raises(ValueError, match="different configuration") as err:
        _gt(second, tmp_path)
    assert field in str(err.value)


def test_other_explained_examples_are_refused(tmp_path):
    """The explained set is part of the ground truth's identity."""
    task = make_task(linear, "cross_entropy", "margin", name="t")
    _gt(task, tmp_path)
    with pytest.raises(ValueError, match="explained_fingerprint"):
        _gt(task, tmp_path, explained_seed=2)


def test_checkpoints_of_another_architecture_are_refused_naming_it(tmp_path):
    """A checkpoint directory is tied to the model's architecture, not only the task's name."""
    data = _data(16, 0)
    train_model(make_task(mlp, "cross_entropy", "margin", name="t"), data, RECIPE,
                checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"task\.architecture"):
        train_model(make_task(mlp_tanh, "cross_entropy", "margin", name="t"), data, RECIPE,
                    checkpoint_dir=tmp_path)
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env[0]["threads"] == torch.get_num_threads() and env[0]["torch"] == torch.__version__


def test_every_task_field_is_part_of_the_identity():
    """By construction: every dataclass field of Task appears (the factory as architecture)."""
    ident = task_identity(make_task(linear, "cross_entropy", "margin", name="t"))
    names = {f.name for f in fields(Task)} - {"make_model"}
    assert names <= set(ident) and "architecture" in ident
    assert ident["architecture"]["n_parameters"] == 4 * 2 + 2
    assert task_identity(make_task(mlp, cross_entropy, "margin", name="t"))["architecture"] != \
        task_identity(make_task(mlp_tanh, cross_entropy, "margin", name="t"))["architecture"]


def test_a_manifest_of_an_older_format_is_refused_with_the_command_to_rebuild(tmp_path):
    """A manifest written before the task identity held every field by content (format 1, or
    identity format 1) cannot be compared field by field: refused, naming the formats and the
    directory to delete, whether or not its other fields match."""
    task = make_task(linear, "cross_entropy", "margin", name="t")
    _gt(task, tmp_path)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    from tdatune.utils.fingerprint import fingerprint_config

    legacy = {k: v for k, v in manifest.items() if k not in ("format", "fingerprint")}
    legacy["task"] = {"name": "t", "output": "margin"}  # what format 1 recorded, by hand
    atomic_write_json(path, {**legacy, "fingerprint": fingerprint_config(legacy)})
    with pytest.raises(ValueError, match=r"older tdatune \(record format 1, task identity format 1"
                       ) as err:
        _gt(task, tmp_path)
    assert f"rm -r {tmp_path}" in str(err.value)
    older = {k: v for k, v in manifest.items() if k != "fingerprint"}
    older["task"] = {**manifest["task"], "identity_format": 1}
    atomic_write_json(path, {**older, "fingerprint": fingerprint_config(older)})
    with pytest.raises(ValueError, match="task identity format 1"):
        _gt(task, tmp_path)


def test_checkpoints_of_an_older_format_are_refused_with_the_command_to_rebuild(tmp_path):
    """The same for a checkpoint directory: a format-1 record (no architecture) is refused."""
    data = _data(12, 0)
    task = make_task(linear, "cross_entropy", "margin", name="t")
    recipe = RECIPE
    train_model(task, data, recipe, seed=0, checkpoint_dir=tmp_path)
    path = tmp_path / "recipe.json"
    saved = json.loads(path.read_text())
    old = {"recipe": saved["meta"]["recipe"], "seed": 0, "task": "t", "n": 12}
    atomic_write_json(path, {"fingerprint": "f1", "meta": old})
    with pytest.raises(ValueError, match=r"older tdatune \(record format 1") as err:
        train_model(task, data, recipe, seed=0, checkpoint_dir=tmp_path)
    assert f"rm -r {tmp_path}" in str(err.value)


# -- a training function must train on what it is given -------------------------------------------

def _fit(data) -> nn.Module:
    """Three full-batch SGD steps of a fresh linear model on ``data``."""
    model = linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        cross_entropy(model(data.inputs), data.targets).mean().backward()
        opt.step()
    return model


def train_everything(data, seed):
    """Ignores the subset it is given: trains on a fixed data set."""
    return _fit(_data(16, 0))


def train_given(data, seed):
    """Trains on the subset it is given."""
    return _fit(data)


def test_a_training_function_that_ignores_its_data_is_refused(tmp_path):
    """Two subsets, same seed, same state: refused before any model of the ground truth."""
    task = make_task(linear, "cross_entropy", "margin", name="t")
    with pytest.raises(ValueError, match="same trained state"):
        build_ground_truth(task, TrainFunction(train_everything), _data(16, 0), _data(5, 1),
                           CONFIG, tmp_path / "a", backend="sequential", show_progress=False)
    assert not list((tmp_path / "a" / "models").glob("m*.npy"))
    gt = build_ground_truth(task, TrainFunction(train_given), _data(16, 0), _data(5, 1), CONFIG,
                            tmp_path / "b", backend="sequential", show_progress=False)
    assert gt.outputs.shape == (3, 1, 5)


def test_the_trained_setting_is_refused_before_it_is_said_to_be_reused(tmp_path):
    """A checkpoint directory of another run: the refusal names the field, and nothing said
    'reusing' before it."""
    from tdatune.study.prepare import train_setting

    said: list[str] = []
    train_setting("digits-lr", tmp_path, sizes=(60, 10, 10), recipe_overrides={"epochs": 1},
                  show_progress=False, say=said.append)
    said.clear()
    with pytest.raises(ValueError, match=r"recipe\.lbfgs_iters"):
        train_setting("digits-lr", tmp_path, sizes=(60, 10, 10),
                      recipe_overrides={"epochs": 1, "lbfgs_iters": 7}, show_progress=False,
                      say=said.append)
    assert not any("reusing" in s for s in said)


def test_a_format_2_cell_with_another_field_is_stale(out):
    """A format-2 cell is kept only when every field it recorded matches: another grid is stale."""
    (path,) = list((out / "cells").glob("*.json"))
    raw = json.loads(path.read_text())
    raw["definition"]["format"] = 2
    del raw["definition"]["inputs"]
    raw["definition"]["spectrum_grid"] = 9
    raw["fingerprint"] = "legacy"
    atomic_write_json(path, raw)
    with pytest.raises(FileNotFoundError, match="no finished cell"):
        load_results(out)


def test_the_study_default_of_epoch_alpha_and_none(tmp_path):
    """LDS-at-default matching: epoch -1 is the last checkpoint's index (recipe epochs = 2 ->
    1), alpha's default is the sweep's, a default of None (no projection) matches None."""
    from tdatune.study.results import is_default

    spec = _spec(tmp_path, BASE)
    method = spec.method("iffim")
    assert [is_default(spec, "digits-lr", method, "epoch", e) for e in (-1, 0, 1)] == [
        True, False, True]
    assert [is_default(spec, "digits-lr", method, "alpha", a) for a in (0.25, 0.5)] == [
        False, True]
    assert [is_default(spec, "digits-lr", method, "proj_dim", d) for d in (None, 16)] == [
        True, False]
