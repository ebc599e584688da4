"""Sweeps: spec validation, cells against direct attribution + LDS, resume, report."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from tdatune.attributors.iffim import IFFIM
from tdatune.evaluate.lds import lds
from tdatune.study.report import write_report
from tdatune.study.sweep import expand_cells, load_spec, run_sweep, spec_from_dict

SPEC = """
name = "tiny"
settings = ["digits-lr"]
grid_points = 6
[sizes]
digits-lr = [150, 40, 30]
[recipes]
digits-lr = { epochs = 2 }
[groundtruth]
n_subsets = 8
[[methods]]
name = "iffim"
fit = { proj_dim = ["none", 32] }
score = { lam = [1e-4, 1e-2] }
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    (root / "spec.toml").write_text(SPEC)
    spec = load_spec(root / "spec.toml")
    cells = run_sweep(spec, root / "out", show_progress=False, say=lambda *a: None)
    return spec, root / "out", cells


def test_cells_equal_direct_attribution_and_lds(swept):
    spec, out, cells = swept
    assert len(cells) == 2 and {c["fit"]["proj_dim"] for c in cells} == {None, 32}
    from tdatune.study.prepare import prepare_setting

    prepared = prepare_setting("digits-lr", out / "settings" / "digits-lr", spec.groundtruth,
                               sizes=(150, 40, 30), recipe_overrides={"epochs": 2},
                               show_progress=False, say=lambda *a: None)
    gt = prepared.groundtruth
    for cell in cells:
        att = IFFIM(proj_dim=cell["fit"]["proj_dim"]).fit(prepared.context)
        for row in cell["rows"]:
            direct = lds(att.score(prepared.splits.test, lam=row["lam"]), gt.masks, gt.mean_outputs)
            assert row["lds"] == pytest.approx(direct.mean, abs=1e-9)
        assert "surrogate" in cell and cell["surrogate"]["lambda"] > 0
        sigma, _ = att.surrogate_spectrum(prepared.splits.val)
        nonzero = sigma[sigma > 1e-10 * sigma.max()].numpy()
        for q, (lam_q, lds_q) in cell["quantile_baselines"].items():
            assert lam_q == pytest.approx(float(np.quantile(nonzero, float(q))))
            direct = lds(att.score(prepared.splits.test, lam=lam_q), gt.masks, gt.mean_outputs)
            assert lds_q == pytest.approx(direct.mean, abs=1e-9)


def test_resume_recomputes_only_missing_cells(swept):
    spec, out, _ = swept
    files = sorted((out / "cells").glob("*.json"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    files[0].unlink()
    run_sweep(spec, out, show_progress=False, say=lambda *a: None)
    assert files[0].exists()
    assert files[1].stat().st_mtime_ns == stamps[files[1]]


def test_report_tables_and_figures(swept):
    _, out, cells = swept
    path = write_report(out)
    text = path.read_text()
    assert "digits-lr | iffim" in text and "proj_dim=32" in text
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(len(c["rows"]) for c in cells) == 4
    best = max(r["lds"] for c in cells for r in c["rows"])
    assert f"{best:.3f}" in text
    assert (out / "fig_digits-lr_iffim.png").read_bytes()[:4] == b"\x89PNG"


def test_ray_backend_gives_the_same_cells_as_local(swept, tmp_path):
    pytest.importorskip("ray")
    spec, _, cells = swept
    ray_cells = run_sweep(spec, tmp_path / "ray", backend="ray", show_progress=False,
                          say=lambda *a: None)
    local = {str(c["fit"]): c["rows"] for c in cells}
    for cell in ray_cells:
        for got, want in zip(cell["rows"], local[str(cell["fit"])], strict=True):
            assert got["lds"] == pytest.approx(want["lds"], abs=1e-9)
    assert len(list((tmp_path / "ray" / "cells").glob("*.json"))) == 2


def test_spec_errors_name_the_problem():
    base = {"settings": ["digits-lr"], "methods": [{"name": "iffim"}]}
    with pytest.raises(ValueError, match="unknown attributor"):
        spec_from_dict({**base, "methods": [{"name": "nope"}]})
    with pytest.raises(ValueError, match="unknown hyperparameter 'damping'"):
        spec_from_dict({**base, "methods": [{"name": "iffim", "score": {"damping": [1]}}]})
    with pytest.raises(ValueError, match="fit-stage"):
        spec_from_dict({**base, "methods": [{"name": "iffim", "score": {"proj_dim": [8]}}]})
    with pytest.raises(ValueError, match="proj_dim"):
        spec_from_dict({**base, "methods": [{"name": "iffim", "fit": {"proj_dim": [0]}}]})
    with pytest.raises(ValueError, match="unknown sweep keys"):
        spec_from_dict({**base, "setings": []})
    with pytest.raises(ValueError, match="threshold"):
        spec_from_dict({**base, "threshold": 2})


def test_expand_cells_is_the_cartesian_product():
    spec = spec_from_dict({"settings": ["digits-lr", "digits-mlp"], "methods": [
        {"name": "iffim", "fit": {"proj_dim": [8, 16], "proj_seed": [0, 1, 2]}}]})
    cells = expand_cells(spec)
    assert len(cells) == 12 and len({c.cell_id for c in cells}) == 12
    assert np.all([c.method == "iffim" for c in cells])


def test_cells_that_cannot_run_or_select_are_recorded_not_fatal(tmp_path):
    spec = spec_from_dict({
        "settings": ["digits-mlp"], "grid_points": 5, "sizes": {"digits-mlp": [120, 30, 30]},
        "recipes": {"digits-mlp": {"epochs": 2}}, "groundtruth": {"n_subsets": 4},
        # digits-mlp has p = 2410 parameters: a 5000-dim projection is invalid for it
        "methods": [{"name": "if_explicit"}, {"name": "iffim", "fit": {"proj_dim": [5000]}}],
    })
    explicit, too_big = run_sweep(spec, tmp_path, show_progress=False, say=lambda *a: None)
    assert len(explicit["rows"]) == 5 and all(np.isfinite(r["lds"]) for r in explicit["rows"])
    assert ("surrogate" in explicit) != ("surrogate_error" in explicit)
    if "surrogate_error" in explicit:
        assert "negative eigenvalue" in explicit["surrogate_error"]
    assert too_big["rows"] == [] and "number of parameters p=2410" in too_big["error"]
    text = write_report(tmp_path).read_text()
    assert "digits-mlp | if_explicit" in text
    assert "Cells that could not run" in text and "proj_dim=5000" in text
