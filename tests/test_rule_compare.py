"""Rules judged over synthetic cells whose answers are worked out by hand here."""

import math

import numpy as np
import pytest

from tdatune.study.rule_compare import (
    RuleFamily,
    cell_gaps,
    centered_rule,
    family,
    lds_at,
    loso,
    mean_rule,
    quantile_rule,
    reliability_signals,
    top_rule,
    xi_rule,
)


def cell(setting, best_log10, top=1.0, xi_at=None, stats=None):
    """A cell whose LDS is 1 - 0.1 |log10(lambda) - best_log10| on a grid 1e-6 ... 1e2 (every
    decade), whose validation mean xi rises linearly in log10 lambda from 0 at 1e-6 to 1 at 1e2
    (so xi = t at log10 lambda = -6 + 8 t), and top eigenvalue ``top``."""
    grid = [10.0 ** e for e in range(-6, 3)]
    rows = [{"lam": g, "lds": 1 - 0.1 * abs(math.log10(g) - best_log10), "spectrum": True}
            for g in grid]
    xi_l = list(np.logspace(-6, 2, 33))
    c = {"setting": setting, "setting_name": setting, "method": "iffim", "rows": rows,
         "xi_curve": {"lambdas": xi_l, "xi_mean": [(math.log10(x) + 6) / 8 for x in xi_l],
                      "top_eigenvalue": top},
         "definition": {"setting": {"seed": 0}}}
    if xi_at is not None:
        c["selections"] = [{"threshold": 0.5, "lambda": xi_at}]
    if stats is not None:
        c["spectrum_stats"] = stats
    return c


def test_lds_is_interpolated_in_log_lambda_and_clamped():
    c = cell("a", -2)
    assert lds_at(c, 1e-2) == pytest.approx(1.0)
    assert lds_at(c, 10 ** -2.5) == pytest.approx(0.95)
    assert lds_at(c, 1e-9) == pytest.approx(1 - 0.1 * 4)  # clamped to the grid's first point


def test_rules_read_the_stored_curve_stats_and_selections():
    c = cell("a", -2, top=10.0, stats={"quantiles": {"0.9": 1e-3}, "mean": 2.0})
    assert xi_rule(0.5)(c) == pytest.approx(1e-2, rel=1e-9)  # -6 + 8 * 0.5 = -2
    assert xi_rule(0.25)(c) == pytest.approx(1e-4, rel=1e-9)
    assert top_rule(0.01)(c) == pytest.approx(0.1)
    assert mean_rule(0.1)(c) == pytest.approx(0.2)
    assert quantile_rule(0.9)(c) == pytest.approx(1e-3)
    assert quantile_rule(0.5)(c) is None and centered_rule(0.5)(c) is None
    c["selections"] = [{"threshold": 0.5, "lambda": 3e-3}]
    assert xi_rule(0.5)(c) == 3e-3  # the stored selection wins over the curve
    never = cell("b", 0)
    never["xi_curve"]["xi_mean"] = [0.1] * 33
    assert xi_rule(0.5)(never) == pytest.approx(1e2)  # never reached: the grid's end
    # gap of the top rule: best at 1e-2 (LDS 1), rule at 0.1 -> one decade off -> 0.1
    np.testing.assert_allclose(cell_gaps([c], top_rule(0.01)), [0.1])


def test_leave_one_setting_out_picks_the_constant_of_the_other_settings():
    """Settings a and b are best at 1e-2 and c at 1e0 (top eigenvalue 1 everywhere): c x top is
    best at c = 1e-2 on a and b, so c (left out) gets 1e-2 and a gap of 0.2; a and b, left out,
    see the mean over the other two, where 1e-2 and 1e0 tie... resolved by the first minimum."""
    cells = [cell("a", -2), cell("b", -2), cell("c", 0)]
    fam = RuleFamily("c x top", top_rule, (1e-2, 1.0), 1e-2, str)
    gaps, chosen = loso(cells, fam, lambda c: c["setting"])
    assert chosen["c"] == 1e-2 and gaps[2] == pytest.approx(0.2)
    # leaving a out: b prefers 1e-2 (gap 0), c prefers 1 (gap 0): mean gaps 0.1 and 0.1, tie
    assert chosen["a"] == 1e-2 and gaps[0] == pytest.approx(0.0)


def test_the_setting_left_out_never_chooses_its_own_constant():
    """Two cells of a (best at 1e-2) and one of b (best at 1e0): left out, a gets the constant b
    prefers (1, gap 0.2 on each cell of a), although a's own cells outnumber b's."""
    cells = [cell("a", -2), cell("a", -2), cell("b", 0)]
    fam = RuleFamily("c x top", top_rule, (1e-2, 1.0), 1e-2, str)
    gaps, chosen = loso(cells, fam, lambda c: c["setting"])
    assert chosen == {"a": 1.0, "b": 1e-2}
    np.testing.assert_allclose(gaps, [0.2, 0.2, 0.2])


def test_reliability_signals_of_a_stored_cell():
    c = cell("a", -2, top=1.0, xi_at=1e-2, stats={"quantiles": {"0.9": 1e-4}, "mean": 1.0})
    sig = reliability_signals(c)
    assert sig["slope"] == pytest.approx(1 / 8)  # xi rises 1/8 per decade
    assert sig["distance"] == pytest.approx(2.0)  # xi at 1e-2, the 0.9 quantile at 1e-4
    assert "spread" not in sig


def test_family_names():
    assert [family(n) for n in ("digits-lr", "mnist-mlp", "cifar2-resnet9", "text-gpt2",
                                "music-transformer", "kjv-bert", "other")] == \
        ["LR", "MLP", "ResNet", "GPT", "music", "BERT", "other"]
