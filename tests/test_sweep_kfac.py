"""K-FAC, EK-FAC and Arnoldi in the sweep harness: their cells' LDS rows equal direct
attribution scored against the same ground truth, and the Fisher kind is a fit-stage value."""

from __future__ import annotations

import pytest

from sweep_specs import tiny_head
from tdatune.attributors import make_attributor
from tdatune.evaluate.lds import lds
from tdatune.study.sweep import Workspace, load_spec, run_sweep

SPEC = tiny_head("kfac") + '''
[[methods]]
name = "ekfac"
vary = [{ lam = "spectrum" }, { fisher = ["empirical", "true"] }]
[[methods]]
name = "kfac"
vary = [{ lam = "spectrum" }]
[[methods]]
name = "if_arnoldi"
defaults = { rank = 8 }
vary = [{ lam = "spectrum" }]
'''


def quiet(*_a: object) -> None:
    """A silent ``say``."""


def test_kronecker_and_arnoldi_cells_equal_direct_attribution(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC)
    spec = load_spec(tmp_path / "spec.toml")
    outcome = run_sweep(spec, tmp_path / "out", show_progress=False, say=quiet)
    assert not outcome.failed
    work = Workspace(spec, tmp_path / "out", "cpu", False, quiet)
    trained = work.trained("digits-lr")
    cells = list(outcome)
    assert {c["attributor"] for c in cells} == {"ekfac", "kfac", "if_arnoldi"}
    assert {c["fit"].get("fisher") for c in cells if c["attributor"] == "ekfac"} >= {"true"}
    for cell in cells:
        assert cell["status"] == "ok" and cell["selections"], cell
        gt = work.groundtruth("digits-lr", cell["alpha"])
        att = make_attributor(cell["attributor"], **cell["fit"]).fit(trained.context)
        for row in cell["rows"][::2]:
            direct = lds(att.score(trained.splits.test, lam=row["lam"]), gt.masks,
                         gt.mean_outputs)
            assert row["lds"] == pytest.approx(direct.mean, abs=1e-6)
    # EK-FAC's curvature is not G^T G / n, so the condition curves (derived for the exact
    # Fisher) are refused with the reason, the rest of the diagnosis stands.
    ekfac = next(c for c in cells if c["attributor"] == "ekfac")
    assert "not orthogonal" in ekfac["condition_error"] and "calibration" in ekfac
