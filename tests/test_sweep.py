"""Sweeps: spec validation, cells against direct attribution + LDS + Algorithm 1, labels,
stale and failed cells, backends, report and figures."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from sweep_specs import TINY_SETTING, tiny_head
from tdatune.attributors.iffim import IFFIM
from tdatune.cli import main
from tdatune.evaluate.lds import lds
from tdatune.select.quantile import quantile_lambda
from tdatune.select.surrogate import select_lambda
from tdatune.study.report import write_report
from tdatune.study.sweep import Workspace, expand_cells, load_spec, run_sweep, spec_from_dict

SETTING = TINY_SETTING

SPEC = tiny_head("tiny") + '''
[[methods]]
name = "iffim"
vary = [{ lam = "spectrum" }, { proj_dim = [16, 32] },
        { alpha = [0.25, 0.5], lam = [1e-3, 1e-2] }]

[[methods]]
name = "iffim"
label = "iffim-proj"
fit = { proj_dim = [32] }
score = { lam = [1e-4, 1e-2] }

[[methods]]
name = "if_lissa"
defaults = { depth = 20 }
vary = [{ lam = [1e-3, 1e3] }]
'''


def quiet(*_a):
    """A silent ``say``."""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    (root / "spec.toml").write_text(SPEC)
    spec = load_spec(root / "spec.toml")
    outcome = run_sweep(spec, root / "out", show_progress=False, say=quiet)
    return spec, root / "out", outcome


def _trained(spec, out):
    work = Workspace(spec, out, "cpu", False, quiet)
    return work.trained("digits-lr"), work


def test_cells_equal_direct_attribution_lds_and_algorithm_1(swept):
    spec, out, outcome = swept
    assert not outcome.failed
    trained, work = _trained(spec, out)
    val, test = trained.splits.val, trained.splits.test
    iffim_cells = [c for c in outcome if c["attributor"] == "iffim"]
    assert len(iffim_cells) == 5  # defaults (a=0.5 and 0.25), proj 16, proj 32, iffim-proj 32
    for cell in iffim_cells:
        gt = work.groundtruth("digits-lr", cell["alpha"])
        att = IFFIM(**cell["fit"]).fit(trained.context)
        for row in cell["rows"]:
            direct = lds(att.score(test, lam=row["lam"]), gt.masks, gt.mean_outputs)
            assert row["lds"] == pytest.approx(direct.mean, abs=1e-9)
        sigma, c_val = att.surrogate_spectrum(val)
        assert [s["threshold"] for s in cell["selections"]] == [0.4, 0.5, 0.6]
        for s in cell["selections"]:
            assert s["lambda"] == pytest.approx(select_lambda(sigma, c_val, s["threshold"]).lam,
                                                rel=1e-9)
            direct = lds(att.score(test, lam=s["lambda"]), gt.masks, gt.mean_outputs)
            assert s["lds"] == pytest.approx(direct.mean, abs=1e-9)
        assert cell["surrogate"] == cell["selections"][1]
        for q, (lam_q, lds_q) in cell["quantile_baselines"].items():
            assert lam_q == pytest.approx(quantile_lambda(sigma, float(q)))
            direct = lds(att.score(test, lam=lam_q), gt.masks, gt.mean_outputs)
            assert lds_q == pytest.approx(direct.mean, abs=1e-9)
        # the stored mean-xi curve against the formula S2 / sqrt(S1 S3), written out here
        xi = cell["xi_curve"]
        sig, c = sigma.numpy(), c_val.numpy()
        w = sig * c**2
        keep = w.sum(axis=1) > 0
        for lam, got in zip(xi["lambdas"][::7], xi["xi_mean"][::7], strict=True):
            s1, s2, s3 = ((w[keep] / (sig + lam) ** j).sum(axis=1) for j in (1, 2, 3))
            assert got == pytest.approx(float(np.mean(s2 / np.sqrt(s1 * s3))), rel=1e-9)


def test_method_labels_keep_entries_of_one_attributor_apart(swept):
    _, _, outcome = swept
    by_label = {}
    for cell in outcome:
        by_label.setdefault(cell["method"], []).append(cell)
    assert set(by_label) == {"iffim", "iffim-proj", "if_lissa"}
    (proj,) = by_label["iffim-proj"]
    assert [r["lam"] for r in proj["rows"]] == [1e-4, 1e-2]
    same_fit = [c for c in by_label["iffim"] if c["fit"]["proj_dim"] == 32]
    assert len(same_fit) == 1 and [r["lam"] for r in same_fit[0]["rows"]] == [1e-3]


def test_a_diverging_lissa_value_is_an_error_row_not_a_failed_cell(swept):
    _, _, outcome = swept
    (cell,) = [c for c in outcome if c["method"] == "if_lissa"]
    assert cell["status"] == "ok"
    ok, bad = cell["rows"]
    assert ok["lam"] == 1e-3 and np.isfinite(ok["lds"]) and "error" not in ok
    assert bad["lam"] == 1e3 and np.isnan(bad["lds"]) and "scale" in bad["error"]


def test_report_draws_every_figure_kind_with_its_csv(swept):
    _, out, outcome = swept
    text = write_report(out).read_text()
    figures = out / "figures"
    for name in ["hp_iffim_lam", "hp_iffim_proj_dim", "hp_if_lissa_lam",
                 "pair_digits-lr_iffim_alpha_x_lam", "pair_digits-lr_iffim-proj_proj_dim_x_lam",
                 "selection_iffim", "xi_iffim"]:
        assert (figures / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
        assert f"figures/{name}.png" in text and f"figures/{name}.csv" in text
    with open(figures / "hp_iffim_proj_dim.csv") as handle:
        rows = list(csv.DictReader(handle))
    cells = {c["fit"]["proj_dim"]: c for c in outcome if c["method"] == "iffim" and c["alpha"] == 0.5}
    assert sorted(int(r["proj_dim"]) for r in rows) == [16, 32]
    for r in rows:  # the plotted LDS is the cell's LDS at the study-default lambda (1e-3)
        (want,) = [x["lds"] for x in cells[int(r["proj_dim"])]["rows"] if x["lam"] == 1e-3]
        assert float(r["lds"]) == pytest.approx(want)
    with open(out / "sensitivity.csv") as handle:
        sens = {(r["method"], r["hyperparameter"]): r for r in csv.DictReader(handle)}
    lam_rows = [r["lds"] for r in cells[None]["rows"] if r.get("spectrum")]
    assert float(sens[("iffim", "lam")]["range"]) == pytest.approx(max(lam_rows) - min(lam_rows))
    assert "Gap to the grid best" in text and "surrogate ξ ≥ 0.4" in text
    with open(out / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == sum(len(c["rows"]) for c in outcome)


def test_a_changed_grid_is_recomputed_never_served_stale(tmp_path):
    base = SETTING + '[[methods]]\nname = "iffim"\nscore = { lam = [1e-3] }\n'
    spec = load_spec(_write(tmp_path / "a.toml", base))
    (first,) = run_sweep(spec, tmp_path / "out", show_progress=False, say=quiet)
    said = []
    spec2 = load_spec(_write(tmp_path / "b.toml", base.replace("[1e-3]", "[1e-3, 1e-1]")))
    (second,) = run_sweep(spec2, tmp_path / "out", show_progress=False, say=said.append)
    assert [r["lam"] for r in second["rows"]] == [1e-3, 1e-1]
    assert second["rows"][0]["lds"] == pytest.approx(first["rows"][0]["lds"], abs=1e-12)
    assert any("definition changed (lambdas)" in s for s in said)
    assert any("0 already done, 1 to run" in s for s in said)
    # a changed recipe moves the setting to a new directory: trained anew, never reused
    spec3 = load_spec(_write(tmp_path / "c.toml", base.replace("epochs = 2", "epochs = 3")))
    said.clear()
    run_sweep(spec3, tmp_path / "out", show_progress=False, say=said.append)
    assert any("definition changed (" in s and "lambdas" in s and "setting.recipe.epochs" in s
               for s in said)
    assert len(list((tmp_path / "out" / "settings").iterdir())) == 2
    # the report serves only the current spec's cells
    text = write_report(tmp_path / "out").read_text()
    assert "1 current cells" in text


def test_failed_cell_is_stored_reported_retried_and_exits_non_zero(tmp_path, capsys):
    spec_text = SETTING + '''
[[methods]]
name = "iffim"
label = "too-big"
fit = { proj_dim = [5000] }
score = { lam = [1e-3] }
[[methods]]
name = "iffim"
score = { lam = [1e-3] }
'''
    path = _write(tmp_path / "spec.toml", spec_text)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 cells failed" in err and "FAILED cells/digits-lr__too-big" in err
    assert "p=650" in err
    (failed,) = list((out / "cells").glob("digits-lr__too-big*.json"))
    record = json.loads(failed.read_text())
    assert record["status"] == "failed" and "ValueError" in record["error"]
    assert "Cells that failed" in (out / "report.md").read_text()
    said = []
    outcome = run_sweep(load_spec(path), out, show_progress=False, say=said.append)
    assert any("failed last time" in s and "retrying" in s for s in said)
    assert any("1 already done, 1 to run" in s for s in said)
    assert len(outcome.failed) == 1


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_process_and_ray_backends_give_the_local_cells(swept, tmp_path, backend):
    if backend == "ray":
        pytest.importorskip("ray")
    spec, out, outcome = swept
    spec = spec_from_dict({**spec.to_dict(), "methods": [m for m in spec.to_dict()["methods"]
                                                         if m["name"] == "iffim"]})
    shutil.copytree(out / "settings", tmp_path / backend / "settings")  # trained once, not again
    other = run_sweep(spec, tmp_path / backend, backend=backend, show_progress=False, say=quiet)
    local = {c["cell_id"]: c for c in outcome}
    assert len(other) == 5 and not other.failed
    for cell in other:
        want = local[cell["cell_id"]]
        assert cell["fingerprint"] == want["fingerprint"]
        for got, ref in zip(cell["rows"], want["rows"], strict=True):
            # the eigendecomposition runs in another process (other thread count): the spectrum
            # grid agrees to float rounding, not bit for bit
            assert got["lam"] == pytest.approx(ref["lam"], rel=1e-9)
            assert got["lds"] == pytest.approx(ref["lds"], abs=1e-9)
        assert cell["surrogate"]["lambda"] == pytest.approx(want["surrogate"]["lambda"], rel=1e-9)


def test_explain_scores_the_first_test_examples_against_their_ground_truth(tmp_path):
    from tdatune.attributors.if_cg import IFCG

    spec = load_spec(_write(tmp_path / "e.toml", SETTING + '''
[[methods]]
name = "if_cg"
explain = 12
vary = [{ max_iter = [2, 4] }]
[[methods]]
name = "iffim"
explain = 12
vary = [{ lam = [1e-2] }]
'''))
    outcome = run_sweep(spec, tmp_path / "out", show_progress=False, say=quiet)
    assert not outcome.failed
    trained, work = _trained(spec, tmp_path / "out")
    gt = work.groundtruth("digits-lr", 0.5)
    first = trained.splits.test.subset(np.arange(12))
    outputs = gt.mean_outputs[:, :12]  # the ground truth of those 12 examples, sliced here
    cg = IFCG().fit(trained.context)
    for cell in outcome:
        assert cell["n_explained"] == 12
        att = cg if cell["attributor"] == "if_cg" else IFFIM().fit(trained.context)
        for row in cell["rows"]:
            values = {k: row[k] for k in ("lam", "max_iter") if k in row}
            direct = lds(att.score(first, **values), gt.masks, outputs)
            assert row["lds"] == pytest.approx(direct.mean, abs=1e-9)
    report = write_report(tmp_path / "out").read_text()
    assert "if_cg explains the first 12; iffim explains the first 12" in report
    with open(tmp_path / "out" / "results.csv") as f:
        assert {r["n_explained"] for r in csv.DictReader(f)} == {"12"}
    full = spec_from_dict({**spec.to_dict(), "methods": [
        {**m, "explain": None} for m in spec.to_dict()["methods"]]})
    said: list[str] = []
    run_sweep(full, tmp_path / "out", show_progress=False, say=said.append)
    assert any("definition changed" in s and "explain" in s for s in said)


def _write(path, text):
    path.write_text(text)
    return path


BASE = {"settings": ["digits-lr"], "methods": [{"name": "iffim"}]}


@pytest.mark.parametrize("change, match", [
    ({"methods": [{"name": "nope"}]}, "unknown attributor 'nope'"),
    ({"methods": [{"name": "iffim", "score": {"damping": [1]}}]}, "unknown hyperparameter 'damping'"),
    ({"methods": [{"name": "iffim", "score": {"proj_dim": [8]}}]}, "fit-stage"),
    ({"methods": [{"name": "iffim", "fit": {"proj_dim": [0]}}]}, "proj_dim"),
    ({"methods": [{"name": "iffim", "score": {"lam": [1e-3, -1.0]}}]}, "invalid lam=-1.0"),
    ({"methods": [{"name": "if_cg", "vary": [{"lam": "spectrum"}]}]}, "no eigen spectrum"),
    ({"methods": [{"name": "iffim", "vary": [{"lamda": [1]}]}]}, "unknown hyperparameter 'lamda'"),
    ({"methods": [{"name": "iffim", "vary": [{"alpha": [1.5]}]}]}, "alpha"),
    ({"methods": [{"name": "iffim"}, {"name": "iffim"}]}, "distinct `label`"),
    ({"methods": [{"name": "iffim", "defaults": {"lam": 1}, "colour": 1}]}, "unknown key.*colour"),
    ({"groundtruth": {"n_subset": 5}}, r"unknown key\(s\) n_subset in \[groundtruth\]; valid:.*n_subsets"),
    ({"groundtruth": {"alpha": 0}}, "alpha"),
    ({"setings": []}, "unknown key"),
    ({"threshold": 2}, "threshold"),
    ({"thresholds": [0.5, 1.0]}, "threshold"),
    ({"grid_points": 1}, "grid_points"),
    ({"settings": ["nowhere"]}, "unknown setting 'nowhere'"),
    ({"settings": [{"name": "digits-lr", "sizes": [10, 0, 5]}]}, "val >= 1"),
    ({"settings": [{"name": "digits-lr", "recipe": {"epoch": 3}}]}, "unknown key.*epoch.*epochs"),
    ({"settings": [{"name": "digits-lr", "recipe": {"optimizer": "rmsprop"}}]}, "optimizer"),
    ({"settings": [{"name": "cifar2-resnet9", "model": {"widht": 8}}]}, "unknown option.*widht.*width"),
    ({"settings": [{"name": "digits-lr"}, {"name": "digits-lr"}]}, "distinct `label`"),
    ({"sizes": {"mnist-lr": [10, 5, 5]}}, "not a setting of this sweep"),
    ({"methods": [{"name": "if_cg", "explain": 1}]}, "explain is the number of test examples"),
    ({"methods": [{"name": "if_cg", "settings": ["mnist-lr"]}]},
     "settings names mnist-lr, which is not a setting of this sweep \\(digits-lr\\)"),
    ({"methods": [{"name": "if_cg", "settings": "digits-lr"}]}, "settings is a list"),
    ({"methods": [{"name": "if_cg", "explain": True}]}, "explain is the number of test examples"),
    ({"settings": [{"name": "digits-lr", "sizes": [10, 5, 5]}],
      "methods": [{"name": "if_cg", "explain": 6}]}, "explain = 6, but digits-lr has only 5"),
])
def test_spec_errors_name_the_problem(change, match):
    with pytest.raises(ValueError, match=match):
        spec_from_dict({**BASE, **change})


def test_a_method_restricted_to_some_settings_has_cells_only_there():
    spec = spec_from_dict({"settings": ["digits-lr", "digits-mlp"], "methods": [
        {"name": "if_explicit", "settings": ["digits-lr"], "vary": [{"epoch": [1, 2]}]},
        {"name": "iffim", "vary": [{"proj_dim": [16, 32]}]}]})
    cells = {(c.setting, c.method) for c in expand_cells(spec)}
    assert cells == {("digits-lr", "if_explicit"), ("digits-lr", "iffim"),
                     ("digits-mlp", "iffim")}
    assert spec_from_dict(spec.to_dict()).methods[0].settings == ["digits-lr"]


def test_sub_experiments_vary_one_factor_around_the_study_defaults():
    spec = spec_from_dict({"settings": ["digits-lr", "digits-mlp"], "methods": [
        {"name": "trak", "vary": [{"lam": "spectrum"}, {"proj_dim": [64, 128]}, {"epoch": [0, 1]}]},
        {"name": "tracin", "vary": [{"normalize": [True, False]}, {"epoch": [[0, 1], [1]]}]},
    ]})
    cells = expand_cells(spec)
    trak = [c for c in cells if c.method == "trak" and c.setting == "digits-lr"]
    fits = sorted((dict(c.fit)["proj_dim"], str(dict(c.fit)["checkpoints"])) for c in trak)
    # defaults: proj_dim 512, checkpoints None (the last); each sub-experiment moves one of them
    assert fits == [(64, "None"), (128, "None"), (512, "(0,)"), (512, "(1,)"), (512, "None")]
    default = next(c for c in trak if dict(c.fit)["proj_dim"] == 512 and dict(c.fit)["checkpoints"]
                   is None)
    assert default.spectrum and default.lambdas == ()
    moved = next(c for c in trak if dict(c.fit)["proj_dim"] == 64)
    assert not moved.spectrum and moved.lambdas == (0.0,)  # at TRAK's study-default lambda
    tracin = [c for c in cells if c.method == "tracin" and c.setting == "digits-lr"]
    assert len(tracin) == 3  # default checkpoints (both normalize values), [0, 1], [1]
    default = next(c for c in tracin if dict(c.fit)["checkpoints"] is None)
    assert sorted(dict(s)["normalize"] for s in default.score) == [False, True]
    assert len({c.cell_id for c in cells}) == len(cells) == 16


def test_line_styles_stay_distinct_beyond_ten_lines():
    from tdatune.study.figures import styles

    looks = [(s["color"], s["linestyle"], s["marker"]) for s in styles(40)]
    assert len(set(looks)) == 40
    assert len({s["color"] for s in styles(10)}) == 10


KILL_SPEC = 'name = "kill"\ngrid_points = 6\n' + SETTING + '''
[[methods]]
name = "iffim"
vary = [{ lam = "spectrum" }, { proj_dim = [8, 16, 32, 64] }]
'''


def test_kill_9_during_a_sweep_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A real ``tdatune sweep`` subprocess killed with SIGKILL once two cells are stored, then
    rerun: the finished cells are kept, the rest computed, and every cell equals a run that was
    never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    spec_path = _write(tmp_path / "spec.toml", KILL_SPEC)
    killed = tmp_path / "killed"
    import torch

    # the same thread count as this process, so that both runs round alike
    env = {**os.environ, "TDATUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # the process kills itself right after its second cell file is stored: no timing race
    code = textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        import tdatune.utils.atomic as atomic
        real = atomic.atomic_write_bytes

        def write_then_maybe_die(path, data, **kwargs):
            written = real(path, data, **kwargs)
            path = Path(path)
            if path.parent.name == "cells" and len(list(path.parent.glob("*.json"))) >= 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return written

        atomic.atomic_write_bytes = write_then_maybe_die
        from tdatune.cli import main
        raise SystemExit(main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, "-c", code, "sweep", str(spec_path), "--out",
                           str(killed), "--quiet"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    stored = {p.name: p.stat().st_mtime_ns for p in (killed / "cells").glob("*.json")}
    assert len(stored) == 2
    said = []
    spec = load_spec(spec_path)
    resumed = run_sweep(spec, killed, show_progress=False, say=said.append)
    assert any(f"{len(stored)} already done, {5 - len(stored)} to run" in s for s in said)
    assert all((killed / "cells" / n).stat().st_mtime_ns == t for n, t in stored.items())
    clean = run_sweep(spec, tmp_path / "clean", show_progress=False, say=quiet)
    for a, b in zip(resumed, clean, strict=True):
        assert a["cell_id"] == b["cell_id"] and a["fingerprint"] == b["fingerprint"]
        assert [(r["lam"], r["lds"]) for r in a["rows"]] == [(r["lam"], r["lds"]) for r in b["rows"]]
