"""The numbers a sweep reports, checked against independent computations: each alpha's LDS
against an own Spearman over that alpha's stored ground truth, the sensitivity table's LDS at
the study default against the cell rows, every figure CSV value against the raw cell JSON,
and ``tdatune rules`` counts and gaps against the cell files.

One tiny digits-lr sweep (module fixture, run through the CLI) serves every test. Expected
values are read from the files on disk with ``json`` / ``csv`` / ``numpy`` only, never through
tdatune's loaders or helpers (the one exception: the attributor's score matrix, whose LDS is
then computed here).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from sweep_specs import TINY_SETTING, tiny_head
from tdatune.attributors.iffim import IFFIM
from tdatune.cli import main
from tdatune.study.prepare import TrainedSetting, train_setting
from tdatune.study.results import load_results
from tdatune.study.sweep import load_spec, run_sweep

DEFAULT_LAM = 1e-3                       # IFFIM's study default (docs/sweeps.md)
ALPHAS = (0.25, 0.5)                     # 0.5 is the sweep's default alpha
ALPHA_LAMS = (1e-3, 1e-2)
LISTED = (1e-5, 2e-4, 1e-3, 1e-1, 10.0)  # a listed lambda sub-experiment; 2e-4 beats the default

SPEC = tiny_head("values") + '''
[[methods]]
name = "iffim"
vary = [{ lam = "spectrum" }, { lam = [1e-5, 2e-4, 1e-3, 1e-1, 10.0] }, { proj_dim = [16, "none"] },
        { alpha = [0.25, 0.5], lam = [1e-3, 1e-2] }]

[[methods]]
name = "iffim"
label = "iffim-p16"
defaults = { proj_dim = 16 }
vary = [{ lam = "spectrum" }]
'''

FIGURES = {"hp_iffim_lam", "hp_iffim_proj_dim", "hp_iffim-p16_lam",
           "pair_digits-lr_iffim_alpha_x_lam", "selection_iffim", "selection_iffim-p16",
           "xi_iffim", "xi_iffim-p16"}


def quiet(*_args: Any) -> None:
    """A silent ``say``."""


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny sweep, run and reported by ``tdatune sweep``; its directory."""
    root = tmp_path_factory.mktemp("values")
    (root / "spec.toml").write_text(SPEC)
    assert main(["sweep", str(root / "spec.toml"), "--out", str(root / "out"), "--quiet"]) == 0
    return root / "out"


# -- raw reads, independent of tdatune's loaders ------------------------------------------------

def raw_cells(out: Path) -> list[dict[str, Any]]:
    """Every cell file of a sweep directory, read with json."""
    return [{**json.loads(p.read_text()), "file": f"cells/{p.name}"}
            for p in sorted((out / "cells").glob("*.json"))]


def raw_cell(out: Path, method: str, alpha: float, proj_dim: int | None) -> dict[str, Any]:
    """The one cell file of (method, alpha, proj_dim)."""
    (cell,) = [c for c in raw_cells(out) if c["method"] == method and c["alpha"] == alpha
               and c["fit"]["proj_dim"] == proj_dim]
    return cell


def read_csv(path: Path) -> list[dict[str, str]]:
    """A CSV file as dicts (header order kept in each dict)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def groundtruth_dir(out: Path, alpha: float) -> Path:
    """The ground-truth directory whose manifest says ``alpha``."""
    found = []
    for path in out.glob("settings/**/manifest.json"):
        manifest = json.loads(path.read_text())
        if isinstance(manifest.get("config"), dict) and manifest["config"].get("alpha") == alpha:
            found.append(path.parent)
    (directory,) = found
    return directory


def own_lds(scores: torch.Tensor, masks: np.ndarray, outputs: np.ndarray) -> float:
    """Mean over explained examples of the Spearman correlation, over subsets, between the
    subset sums of the scores and the retrained models' outputs (mean over seeds)."""
    sums = masks.astype(np.float64) @ scores.double().numpy().T      # [M, m]
    actual = outputs.mean(axis=1)                                     # [M, S, m] -> [M, m]
    rhos = [spearmanr(sums[:, j], actual[:, j]).statistic for j in range(sums.shape[1])]
    return float(np.nanmean(rhos))


def trained_setting(out: Path) -> TrainedSetting:
    """The sweep's trained digits-lr, reloaded from its checkpoints (no training)."""
    (checkpoints,) = out.glob("settings/*/checkpoints")
    directory = checkpoints.parent
    return train_setting("digits-lr", directory, seed=0, sizes=(150, 40, 30),
                         recipe_overrides={"epochs": 2}, device="cpu", show_progress=False,
                         say=quiet)


# -- 1. an alpha sub-experiment reads each alpha's cell ---------------------------------------

def test_each_alphas_lds_is_computed_against_that_alphas_own_ground_truth(swept: Path) -> None:
    """Alpha x lambda: every point's LDS equals an own Spearman LDS on that alpha's ground truth."""
    trained = trained_setting(swept)
    test = trained.splits.test
    att = IFFIM().fit(trained.context)  # every fit-stage value at the study default
    want = {}
    for alpha in ALPHAS:
        gt = groundtruth_dir(swept, alpha)
        masks, outputs = np.load(gt / "masks.npy"), np.load(gt / "outputs.npy")
        assert masks.shape == (8, 150) and int(masks[0].sum()) == round(alpha * 150)
        for lam in ALPHA_LAMS:
            want[(alpha, lam)] = own_lds(att.score(test, lam=lam), masks, outputs)
    # the two alphas must be told apart by their numbers, or the test proves nothing
    assert all(abs(want[(0.25, lam)] - want[(0.5, lam)]) > 1e-3 for lam in ALPHA_LAMS)

    (sub,) = [s for s in load_results(swept).experiments
              if s.method == "iffim" and sorted(s.keys) == ["alpha", "lam"]]
    assert sorted((r["alpha"], r["lam"]) for r in sub.records) == sorted(want)
    for r in sub.records:
        assert r["lds"] == pytest.approx(want[(r["alpha"], r["lam"])], abs=1e-9), r
        stored = json.loads((swept / r["file"]).read_text())
        assert stored["alpha"] == r["alpha"]
        assert stored["definition"]["groundtruth"]["alpha"] == r["alpha"]
    assert len({r["file"] for r in sub.records}) == 2  # one cell file per alpha

    rows = read_csv(swept / "figures" / "pair_digits-lr_iffim_alpha_x_lam.csv")
    assert sorted((float(r["alpha"]), float(r["lam"])) for r in rows) == sorted(want)
    for r in rows:
        assert float(r["lds"]) == pytest.approx(want[(float(r["alpha"]), float(r["lam"]))],
                                                abs=1e-9), r
        assert json.loads((swept / r["file"]).read_text())["alpha"] == float(r["alpha"])


# -- 2. the LDS at the study default -------------------------------------------------------------

def _sensitivity(out: Path, method: str, key: str, values: int) -> dict[str, str]:
    (row,) = [r for r in read_csv(out / "sensitivity.csv") if r["method"] == method
              and r["hyperparameter"] == key and int(r["values"]) == values]
    return row


def test_lds_at_default_is_the_default_lambdas_row_not_the_best(swept: Path) -> None:
    """sensitivity.csv: LDS at the study default equals the cell's row at lam 1e-3 (not the best)."""
    cell = raw_cell(swept, "iffim", 0.5, None)
    listed = {r["lam"]: r["lds"] for r in cell["rows"] if not r["spectrum"] and r["lam"] in LISTED}
    assert sorted(listed) == sorted(LISTED)
    best_lam = max(listed, key=lambda lam: listed[lam])
    assert best_lam != DEFAULT_LAM and listed[best_lam] > listed[DEFAULT_LAM] + 1e-3  # precondition
    row = _sensitivity(swept, "iffim", "lam", len(LISTED))
    assert float(row["lds_at_default"]) == pytest.approx(listed[DEFAULT_LAM], abs=1e-12)
    assert float(row["lds_max"]) == pytest.approx(listed[best_lam], abs=1e-12)
    assert float(row["best_at"]) == best_lam
    assert float(row["lds_min"]) == pytest.approx(min(listed.values()), abs=1e-12)
    # the spectrum grid never holds exactly 1e-3: no LDS at the default there
    grid = [r for r in cell["rows"] if r["spectrum"]]
    assert len(grid) == 6 and all(r["lam"] != DEFAULT_LAM for r in grid)
    assert math.isnan(float(_sensitivity(swept, "iffim", "lam", 6)["lds_at_default"]))


def test_lds_at_default_of_a_none_default(swept: Path) -> None:
    """proj_dim = [16, "none"]: the LDS at the default (no projection) is that cell's lam 1e-3 row."""
    cell = raw_cell(swept, "iffim", 0.5, None)
    (want,) = [r["lds"] for r in cell["rows"] if r["lam"] == DEFAULT_LAM and not r["spectrum"]]
    row = _sensitivity(swept, "iffim", "proj_dim", 2)
    assert float(row["lds_at_default"]) == pytest.approx(want, abs=1e-12)


# -- 4. figure CSVs against the cell files -------------------------------------------------------

def _check_coordinate(cell: dict[str, Any], key: str, text: str) -> None:
    """A varied value in a figure CSV against the cell it names."""
    if key == "alpha":
        assert cell["alpha"] == float(text)
    elif key != "lam":
        assert str(cell["fit"][key]) == text, (key, text, cell["fit"])


def _scored_row(cell: dict[str, Any], row: dict[str, str]) -> None:
    """The CSV row's (lds, sem) is the cell's row at its lambda (the default when not varied)."""
    lam = float(row["lam"]) if "lam" in row else DEFAULT_LAM
    pairs = {(r["lds"], r["sem"]) for r in cell["rows"] if r["lam"] == lam}
    assert (float(row["lds"]), float(row["sem"])) in pairs, (row, pairs)


def test_every_figure_csv_value_is_the_cell_files_value(swept: Path) -> None:
    """Every number in figures/*.csv equals the number in the cell JSON it names."""
    figdir = swept / "figures"
    assert {p.stem for p in figdir.glob("*.csv")} == FIGURES
    assert {p.stem for p in figdir.glob("*.png")} == FIGURES
    cells = {c["file"]: c for c in raw_cells(swept)}
    for name in sorted(FIGURES):
        rows = read_csv(figdir / f"{name}.csv")
        assert rows, name
        header = list(rows[0])
        for row in rows:
            cell = cells[row["file"]]
            assert cell["setting"] == row["setting"] == "digits-lr"
            assert cell["method"] == row["method"]
            if name.startswith(("hp_", "pair_")):
                for key in header[2:header.index("lds")]:
                    _check_coordinate(cell, key, row[key])
                _scored_row(cell, row)
            elif name.startswith("selection_"):
                lam, lds = float(row["lam"]), float(row["lds"])
                if row["marker"] == "":
                    (grid,) = [r for r in cell["rows"] if r["spectrum"] and r["lam"] == lam]
                    assert (grid["lds"], grid["sem"]) == (lds, float(row["sem"]))
                elif row["marker"] == "surrogate":
                    (sel,) = [s for s in cell["selections"] if s["threshold"] == 0.5]
                    assert (sel["lambda"], sel["lds"], sel["sem"]) == (lam, lds, float(row["sem"]))
                elif row["marker"].startswith("default "):
                    default = cell["default_selection"]
                    assert row["marker"] == f"default {default['rule']}"
                    assert (default["lambda"], default["lds"], default["sem"]) == (
                        lam, lds, float(row["sem"]))
                else:
                    q = row["marker"].removeprefix("quantile q=")
                    assert cell["quantile_baselines"][q] == [lam, lds]
            else:
                xi = cell["xi_curve"]
                i = xi["lambdas"].index(float(row["lam"]))
                assert xi["xi_mean"][i] == float(row["xi_mean"])
                assert float(row["lam_over_top"]) == pytest.approx(
                    xi["lambdas"][i] / xi["top_eigenvalue"], rel=1e-14)

    # and nothing is left out: each figure holds every value its cells scored for it
    default, p16 = raw_cell(swept, "iffim", 0.5, None), raw_cell(swept, "iffim-p16", 0.5, 16)
    for cell, hp in ((default, "hp_iffim_lam"), (p16, "hp_iffim-p16_lam")):
        grid = sorted(r["lam"] for r in cell["rows"] if r["spectrum"])
        listed = sorted(LISTED) if cell is default else []
        assert sorted(float(r["lam"]) for r in read_csv(figdir / f"{hp}.csv")) == \
            sorted(grid + listed)
        method = cell["method"]
        sel = read_csv(figdir / f"selection_{method}.csv")
        assert sorted(float(r["lam"]) for r in sel if r["marker"] == "") == grid
        assert sorted(r["marker"] for r in sel if r["marker"]) == \
            ["default quantile", "quantile q=0.1", "quantile q=0.5", "quantile q=0.9", "surrogate"]
        assert len(read_csv(figdir / f"xi_{method}.csv")) == len(cell["xi_curve"]["lambdas"])
    proj = read_csv(figdir / "hp_iffim_proj_dim.csv")
    assert sorted(r["proj_dim"] for r in proj) == ["16", "None"]


# -- 3. tdatune rules over real cell files -------------------------------------------------------

def _rule_cells(out: Path) -> list[dict[str, Any]]:
    """Cells with a spectrum grid and a surrogate selection, from the raw files."""
    return [c for c in raw_cells(out) if any(r["spectrum"] for r in c["rows"]) and "selections" in c]


def _gap_and_side(cell: dict[str, Any], threshold: float) -> tuple[float, str]:
    grid = [r for r in cell["rows"] if r["spectrum"]]
    best = max(grid, key=lambda r: r["lds"])
    (sel,) = [s for s in cell["selections"] if s["threshold"] == threshold]
    ratio = sel["lambda"] / best["lam"]
    where = "above" if ratio > 1.5 else "below" if ratio < 1 / 1.5 else "at"
    return best["lds"] - sel["lds"], where


def _rule_line(text: str, threshold: float) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| surrogate xi >= {threshold:g} |"))
    return [c.strip(" *") for c in line.split("|")[1:-1]]


def test_rules_count_two_cells_of_one_setting_as_two(swept: Path, tmp_path: Path) -> None:
    """Two methods' cells on one setting are two rows of `tdatune rules`, with their own gaps."""
    cells = _rule_cells(swept)
    assert sorted(c["method"] for c in cells) == ["iffim", "iffim-p16"]
    assert {c["setting"] for c in cells} == {"digits-lr"}
    assert main(["rules", str(swept), "--out", str(tmp_path / "r")]) == 0
    rows = read_csv(tmp_path / "r" / "rules.csv")
    assert sorted(r["method"] for r in rows) == ["iffim", "iffim-p16"]
    text = (tmp_path / "r" / "rules.md").read_text()
    for t in (0.4, 0.5, 0.6):
        gaps, sides = zip(*(_gap_and_side(c, t) for c in cells), strict=True)
        rule, n, mean, median, worst = _rule_line(text, t)
        assert rule == f"surrogate xi >= {t:g}" and int(n) == 2
        assert float(mean) == pytest.approx(np.mean(gaps), abs=5e-4)
        assert float(median) == pytest.approx(np.median(gaps), abs=5e-4)
        assert float(worst) == pytest.approx(max(gaps), abs=5e-4)
        line = next(x for x in text.splitlines() if x.startswith(f"| {t:g} |"))
        counts = [int(c) for c in line.split("|")[2:5]]
        assert counts == [sides.count("above"), sides.count("at"), sides.count("below")]


def test_rules_compare_only_the_thresholds_every_sweep_scored(swept: Path, tmp_path: Path) -> None:
    """Sweeps scored at {0.4, 0.5, 0.6} and {0.5, 0.7}: rules compare 0.5 only, over all cells."""
    other = tmp_path / "other"
    shutil.copytree(swept / "settings", other / "settings")  # trained once, not again
    spec = tmp_path / "other.toml"
    spec.write_text('name = "other"\ngrid_points = 5\nthresholds = [0.7]\n' + TINY_SETTING
                    + '[[methods]]\nname = "iffim"\nlabel = "iffim-p16"\n'
                    'defaults = { proj_dim = 16 }\nvary = [{ lam = "spectrum" }]\n')
    outcome = run_sweep(load_spec(spec), other, show_progress=False, say=quiet)
    assert len(outcome) == 1 and not outcome.failed
    (extra,) = _rule_cells(other)
    assert sorted(s["threshold"] for s in extra["selections"]) == [0.5, 0.7]
    assert main(["rules", str(swept), str(other), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "rules.md").read_text()
    assert not any(x.startswith(("| surrogate xi >= 0.4", "| surrogate xi >= 0.6",
                                 "| surrogate xi >= 0.7")) for x in text.splitlines())
    cells = [*_rule_cells(swept), extra]
    gaps = [_gap_and_side(c, 0.5)[0] for c in cells]
    _, n, mean, _, worst = _rule_line(text, 0.5)
    assert int(n) == 3
    assert float(mean) == pytest.approx(np.mean(gaps), abs=5e-4)
    assert float(worst) == pytest.approx(max(gaps), abs=5e-4)
    assert len(read_csv(tmp_path / "r" / "rules.csv")) == 3
    # a default threshold that one of the sweeps never scored is refused
    assert main(["rules", str(swept), str(other), "--out", str(tmp_path / "r2"),
                 "--default", "0.4"]) == 2
