"""The default per attributor chosen out of sample, on hand-made cells worked out by hand here.

Every cell has a 5-point grid 1e-4, 1e-3, 1e-2, 1e-1, 1 (top eigenvalue 1), so "c x top" with
c = 1e-4, 1e-2, 1 reads grid points 0, 2, 4 exactly, and the 0.9 quantile is put at 1e-1
(point 3). Three settings, with LDS along the grid (best 1.0 everywhere):

    A (two training seeds): 1.0  0.8  0.45 0.5  0.4   gaps c=1e-4: 0    1e-2: 0.55 1: 0.6  q: 0.5
    B:                      0.8  0.9  1.0  0.7  0.6   gaps         0.2        0    0.4    0.3
    C:                      0.6  0.7  0.9  0.95 1.0   gaps         0.4        0.1  0      0.05

Nested leave one setting out (mean gap per cell over the other settings):
    A out (B, C):       q 0.175, 1e-4 0.3,   1e-2 0.05,  1 0.2    -> 1e-2, gaps on A 0.55, 0.55
    B out (A, A, C):    q 0.35,  1e-4 0.133, 1e-2 0.4,   1 0.4    -> 1e-4, gap on B 0.2
    C out (A, A, B):    q 0.433, 1e-4 0.067, 1e-2 0.367, 1 0.533  -> 1e-4, gap on C 0.4
out of sample: mean (0.55 + 0.55 + 0.2 + 0.4) / 4 = 0.425, worst 0.55; the 0.9 quantile on the
same cells: (0.5 + 0.5 + 0.3 + 0.05) / 4 = 0.3375, worst 0.5. In sample (all four cells) 1e-4
wins (0.15): had the held-out setting taken part in its own choice, every fold would pick 1e-4
(out-of-sample mean 0.15); had A's seeds been split over folds, A's cells would get 1e-4 (0).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tdatune.study.rule_candidates import (
    Candidate,
    attributor_of,
    block_heuristic_lds,
    default_candidates,
    kind_of,
    on_grid,
    recipe_rule,
    score_candidates,
    single_block_heuristic,
)
from tdatune.study.rule_choice import choose_defaults, recommend, recommended_gaps
from tdatune.study.rule_choice_report import choice_lines, choice_rows
from tdatune.study.rule_compare import mean_rule, quantile_rule, top_rule

GRID = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
LDS = {"A": [1.0, 0.8, 0.45, 0.5, 0.4], "B": [0.8, 0.9, 1.0, 0.7, 0.6],
       "C": [0.6, 0.7, 0.9, 0.95, 1.0]}


def cell(setting: str, attributor: str = "kfac", seed: int = 0, lds: list[float] | None = None,
         recipe: dict | None = None, sizes: tuple[int, int, int] = (100, 10, 10),
         mean: float | None = 0.01, **extra) -> dict:
    """A stored cell on the 5-point grid: top eigenvalue 1, 0.9 quantile 1e-1, mean eigenvalue
    ``mean`` (None: an older cell, without spectrum statistics)."""
    stats = {"quantiles": {"0.9": 1e-1, "0.5": 1e-3}, "top": 1.0, "mean": mean}
    return {"setting": setting, "setting_name": setting, "attributor": attributor,
            "method": attributor, "fit": {},
            "rows": [{"lam": g, "lds": v, "spectrum": True}
                     for g, v in zip(GRID, lds or LDS[setting], strict=True)],
            "xi_curve": {"lambdas": GRID, "xi_mean": [0.1, 0.3, 0.5, 0.7, 0.9],
                         "top_eigenvalue": 1.0},
            **({} if mean is None else {"spectrum_stats": stats}),
            "quantile_baselines": {"0.9": [1e-1, math.nan]},
            "definition": {"setting": {"seed": seed, "recipe": recipe or {}, "sizes": list(sizes)}},
            **extra}


def small_candidates() -> list[Candidate]:
    """The global default first (as the report expects), then c x top at 1e-4, 1e-2, 1."""
    return [Candidate("quantile", 0.9, quantile_rule(0.9))] + [
        Candidate("top", c, top_rule(c)) for c in (1e-4, 1e-2, 1.0)]


def test_nested_choice_leaves_the_whole_setting_out_and_judges_it_by_hand():
    cells = [cell("A", seed=0), cell("B"), cell("A", seed=1), cell("C")]  # A's seeds apart
    ch = choose_defaults(cells, small_candidates())
    kfac = ch.by_attributor["kfac"]
    labels = {f.held_out: ch.table.candidates[f.choice].label for f in kfac.folds}
    assert labels == {"A": "0.01 x top", "B": "0.0001 x top", "C": "0.0001 x top"}
    np.testing.assert_allclose(kfac.oos, [0.55, 0.2, 0.55, 0.4])
    assert np.mean(kfac.oos) == pytest.approx(0.425) and np.max(kfac.oos) == pytest.approx(0.55)
    np.testing.assert_allclose(ch.table.gaps[0], [0.5, 0.3, 0.5, 0.05])  # the 0.9 quantile
    assert ch.table.candidates[kfac.overall].label == "0.0001 x top"  # in sample
    # out of sample it loses to the global default (0.425 > 0.3375): the default stays
    rec = recommend(ch)["kfac"]
    assert (rec.source, rec.candidate.label) == ("global", "q = 0.9")
    assert rec.default == pytest.approx((0.3375, 0.5))


def test_the_choice_per_kind_pools_the_family_and_is_judged_per_attributor():
    """K-FAC on A (two seeds) and C, EK-FAC on B. K-FAC alone: A out -> C's best, 1 x top (0.6
    on A); C out -> A's best, 1e-4 (0.4): mean 1.6 / 3. EK-FAC alone has no other setting. The
    Kronecker family has A, B and C: the folds of the first test (A 0.55, C 0.4, B 0.2)."""
    cells = [cell("A", "kfac", 0), cell("A", "kfac", 1), cell("B", "ekfac"), cell("C", "kfac")]
    ch = choose_defaults(cells, small_candidates())
    np.testing.assert_allclose(ch.by_attributor["kfac"].oos[[0, 1, 3]], [0.6, 0.6, 0.4])
    ekfac = ch.by_attributor["ekfac"]
    assert [f.choice for f in ekfac.folds] == [None] and np.isnan(ekfac.oos[2])
    kron = ch.by_kind["Kronecker"]
    np.testing.assert_allclose(kron.oos, [0.55, 0.55, 0.2, 0.4])
    assert ch.kind_choice("kfac") is kron and ch.kind_choice("ekfac") is kron
    # fewer than three settings: neither choice may replace the default
    assert {r.source for r in recommend(ch).values()} == {"global"}
    text = "\n".join(choice_lines(ch))
    assert "| K-FAC | 3 | 2 | 1 x top (A); 0.0001 x top (C) | 0.533 / 0.600 |" in text
    assert "| EK-FAC | 1 | 1 | no other setting (B) | – |" in text


def test_a_rule_that_holds_everywhere_becomes_the_default():
    """All three settings peak at 1e-4: every fold chooses it (gap 0) and it beats the 0.9
    quantile (0.5 everywhere) in mean and worst."""
    cells = [cell(s, lds=LDS["A"]) for s in ("A", "B", "C")]
    ch = choose_defaults(cells, small_candidates())
    rec = recommend(ch)["kfac"]
    assert (rec.source, rec.candidate.family, rec.candidate.constant) == ("attributor", "top", 1e-4)
    assert rec.oos == pytest.approx((0.0, 0.0)) and rec.default == pytest.approx((0.5, 0.5))
    rows = choice_rows(ch)
    assert [r["held_out"] for r in rows if r["grouping"] == "attributor"] == \
        ["A", "B", "C", "(in sample)"]
    assert all(r["rule"] == "0.0001 x top" and r["mean_gap"] == 0.0 for r in rows)


def test_lambdas_outside_the_grid_are_clamped_counted_and_read_at_the_grid_end():
    """On B, 1e-6 x top lies two decades below the grid (read at 1e-4: gap 0.2) and 10 x top
    one above (read at 1: gap 0.4); 0.99e-4 is within the tolerance; 0 (L-BFGS without weight
    decay) goes to the grid's start. Clamping decides the choice: on A and B 1e-6 x top is
    best (mean 0.1) and C, held out, gets it: gap 0.4."""
    assert on_grid(cell("B"), 1e-6) == (1e-4, True)
    assert on_grid(cell("B"), 10.0) == (1.0, True)
    assert on_grid(cell("B"), 0.99e-4) == (1e-4, False)
    assert on_grid(cell("B"), 0.0) == (1e-4, True)
    cands = [Candidate("quantile", 0.9, quantile_rule(0.9)), Candidate("top", 1e-6, top_rule(1e-6)),
             Candidate("top", 10.0, top_rule(10.0)), Candidate("recipe", None, recipe_rule)]
    lbfgs = {"optimizer": "lbfgs", "weight_decay": 0.0}
    cells = [cell("A", recipe=lbfgs), cell("B", recipe=lbfgs), cell("C", recipe=lbfgs)]
    t = score_candidates(cells, cands)
    np.testing.assert_allclose(t.gaps[1], [0.0, 0.2, 0.4])
    np.testing.assert_allclose(t.gaps[2], [0.6, 0.4, 0.0])
    np.testing.assert_allclose(t.gaps[3], [0.0, 0.2, 0.4])  # lambda 0 -> the grid's start
    assert t.clamped.sum(axis=1).tolist() == [0, 3, 3, 3] and not t.fallback.any()
    ch = choose_defaults(cells, cands)
    c_fold = next(f for f in ch.by_attributor["kfac"].folds if f.held_out == "C")
    assert ch.table.candidates[c_fold.choice].label == "1e-06 x top"
    assert ch.by_attributor["kfac"].oos[2] == pytest.approx(0.4)


def test_a_cell_without_what_a_rule_needs_falls_back_to_the_09_quantile():
    old = cell("B", mean=None)
    t = score_candidates([old], [Candidate("quantile", 0.9, quantile_rule(0.9)),
                                 Candidate("mean", 1.0, mean_rule(1.0))])
    np.testing.assert_allclose(t.gaps[:, 0], [0.3, 0.3])
    assert t.fallback[:, 0].tolist() == [False, True]


def test_the_recipe_rule_by_hand():
    """SGD: steps = 2 x ceil(100 / 64) = 4, 1e-3 + (1 - 0.9) / (0.05 x 4) = 0.501. L-BFGS: the
    weight decay. Adam: steps = 1 x ceil(32 / 16) = 2, sqrt(0.64 / 16) / (0.01 x 2) = 10, plus
    the weight decay 0.5."""
    sgd = {"optimizer": "sgd", "lr": 0.05, "epochs": 2, "batch_size": 64, "momentum": 0.9,
           "weight_decay": 1e-3}
    assert recipe_rule(cell("A", recipe=sgd)) == pytest.approx(0.501)
    assert recipe_rule(cell("A", recipe={**sgd, "momentum": 0.0})) == pytest.approx(5.001)
    assert recipe_rule(cell("A", recipe={"optimizer": "lbfgs", "weight_decay": 3e-3})) == 3e-3
    adam = {"optimizer": "adam", "lr": 0.01, "epochs": 1, "batch_size": 16, "weight_decay": 0.5}
    assert recipe_rule(cell("A", recipe=adam, sizes=(32, 1, 1), mean=0.64)) == pytest.approx(10.5)
    assert recipe_rule(cell("A", recipe={**adam, "optimizer": "AdamW"}, sizes=(32, 1, 1),
                            mean=0.64)) == pytest.approx(10.5)
    assert recipe_rule(cell("A", recipe=adam, mean=None)) is None  # no stored mean eigenvalue
    assert recipe_rule(cell("A", recipe={**sgd, "optimizer": "rmsprop"})) is None
    assert recipe_rule(cell("A")) is None  # no recipe


def test_per_block_damping_reads_the_stored_lds_or_the_one_block_heuristic():
    """Stored per-block LDS 0.97 on B: gap 0.03. One block (nothing stored): 0.1 x mean 0.1 =
    1e-2, B's best: gap 0. Several blocks whose LDS failed to store: the 0.9 quantile (0.3)."""
    per_block = next(c for c in default_candidates() if c.family == "per_layer")
    stored = cell("B", blockwise={"heuristic": {"lds": 0.97}})
    one_block = cell("B", mean=0.1)
    failed = cell("B", mean=0.1, blockwise_error="boom")
    assert block_heuristic_lds(stored) == 0.97 and single_block_heuristic(one_block) == pytest.approx(0.01)
    t = score_candidates([stored, one_block, failed], [default_candidates()[0], per_block])
    np.testing.assert_allclose(t.gaps[1], [0.03, 0.0, 0.3])
    assert t.fallback[1].tolist() == [False, False, True]


def test_attributors_and_kinds_of_cells():
    layer = cell("A", "logra", fit={"blocks": "layer"})
    assert [attributor_of(c) for c in (layer, cell("A", "logra"), cell("A", "if_arnoldi"))] == \
        ["logra-layer", "logra", "if_arnoldi"]
    assert [kind_of(cell("A", a)) for a in ("iffim", "trak", "logra", "if_explicit", "kfac",
                                            "ekfac", "if_arnoldi")] == \
        ["eigen-kernel"] * 4 + ["Kronecker"] * 2 + ["truncated"]


def test_every_default_candidate_scores_the_hand_made_cells():
    cands = default_candidates()
    assert (cands[0].family, cands[0].constant) == ("quantile", 0.9)  # ties go to the default
    assert min(c.constant for c in cands if c.family == "top") == pytest.approx(1e-12)
    t = score_candidates([cell(s) for s in "ABC"])
    assert np.isfinite(t.gaps).all() and (t.gaps >= -1e-12).all()
    assert not math.isnan(float(t.gaps.mean()))


def test_the_rules_command_writes_the_section_and_its_csv(tmp_path):
    """``tdatune rules`` on a real (tiny) sweep: one attributor on one setting has no other
    setting to choose on, so the default stays and the CSV says so."""
    from sweep_specs import tiny_head
    from tdatune.cli import main

    spec = tmp_path / "s.toml"
    spec.write_text(tiny_head("tiny") + '\n[[methods]]\nname = "iffim"\nvary = [{ lam = "spectrum" }]\n')
    assert main(["sweep", str(spec), "--out", str(tmp_path / "sw"), "--quiet"]) == 0
    assert main(["rules", str(tmp_path / "sw"), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "rules.md").read_text()
    assert "## Per attributor, chosen out of sample" in text
    assert "| IFFIM | 1 | 1 | no other setting (" in text
    assert '"iffim": ("quantile", 0.9)' in text
    csv = (tmp_path / "r" / "rules_by_attributor.csv").read_text().splitlines()
    assert csv[0].startswith("grouping,group,held_out,cells,rule")
    assert any(line.startswith("attributor,iffim,(in sample),1,") for line in csv)
    assert any(line.startswith("kind,eigen-kernel,") and ",,," in line for line in csv)  # no fold
    assert "## Reliability of the default" in text
    assert "| IFFIM | q = 0.9 | 1 | " in text.split("## Reliability of the default")[1]
    per_cell = (tmp_path / "r" / "rules_reliability.csv").read_text().splitlines()
    assert len(per_cell) == 2 and per_cell[0].startswith("study,file,setting,seed,attributor,default,")


def test_the_recommended_defaults_together():
    """Scenario of the first test plus a K-FAC-free family: TRAK on A, B, C peaking at 1e-4
    everywhere gets 1e-4 x top (gap 0); K-FAC keeps the 0.9 quantile (0.5, 0.3, 0.5, 0.05)."""
    cells = [cell("A", seed=0), cell("B"), cell("A", seed=1), cell("C")]
    cells += [cell(s, "trak", lds=LDS["A"]) for s in "ABC"]
    ch = choose_defaults(cells, small_candidates())
    recs = recommend(ch)
    assert recs["kfac"].source == "global" and recs["trak"].source == "attributor"
    np.testing.assert_allclose(recommended_gaps(ch, recs), [0.5, 0.3, 0.5, 0.05, 0, 0, 0])
    assert "Together, out of sample over all 7 cells: 0.193 / 0.500, against 0.407 / 0.500" in \
        "\n".join(choice_lines(ch))


def test_the_recipe_rule_has_no_lambda_for_a_training_function_of_ones_own():
    """A cell trained by a TrainFunction records no learning rate or steps: no recipe lambda
    (and no error), as for an optimizer the rule has no formula for."""
    from tdatune.study.rule_candidates import recipe_rule

    cell = {"definition": {"setting": {"recipe": {"train_function": "m:f", "weight_decay": 0.0,
                                                  "options": {}}, "sizes": [100, 10, 10]}}}
    assert recipe_rule(cell) is None
    sgd = {"definition": {"setting": {"recipe": {"optimizer": "sgd", "lr": 0.1, "epochs": 2,
                                                 "batch_size": 30, "momentum": 0.5},
                                      "sizes": [100, 10, 10]}}}
    assert recipe_rule(sgd) == (1 - 0.5) / (0.1 * 2 * 4)  # 4 = ceil(100 / 30) steps an epoch
