"""The default rule per attributor and the rules with constants, by hand."""

from __future__ import annotations

import pytest
import torch

from tdatune.select.default import choose_lambda, default_rule, parse_rule


def test_each_attributor_gets_its_default_rule():
    assert default_rule("kfac") == default_rule("ekfac") == "agree"
    assert default_rule("if_arnoldi") == "top:0.001"
    assert default_rule("logra", {"blocks": "layer"}) == "quantile:0.7"
    assert default_rule("logra", {"blocks": "joint"}) == "quantile"
    assert default_rule("iffim") == default_rule("trak") == default_rule("if_explicit") == "quantile"


def test_rules_with_constants_by_hand():
    """Eigenvalues 1..10 (and a null one): 'top:0.001' is 0.01, 'quantile:0.7' of the non-zero
    eigenvalues is 7.3 by linear interpolation (torch.quantile), the bare quantile 9.1."""
    sigma = torch.tensor([0.0, *range(1, 11)], dtype=torch.float64)
    c_val = torch.ones(3, 11, dtype=torch.float64)
    assert choose_lambda(sigma, c_val, rule="top:0.001").lam == pytest.approx(0.01)
    assert choose_lambda(sigma, c_val, rule="quantile:0.7").lam == pytest.approx(7.3)
    assert choose_lambda(sigma, c_val, rule="quantile").lam == pytest.approx(9.1)
    assert choose_lambda(sigma, c_val, rule="top").lam == pytest.approx(0.1)
    assert parse_rule("quantile:0.25") == ("quantile", 0.25)
    for bad in ("quantile:1.5", "top:-1", "xi:0.4", "median"):
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_the_explain_commands_lam_takes_a_number_json_or_a_rule():
    import argparse

    from tdatune.cli.explain_cmd import parse_damping

    assert parse_damping("1e-3") == 1e-3
    assert parse_damping("[1e-3, 0.5]") == [1e-3, 0.5]
    assert parse_damping('{"fc1": 2e-3, "*": 1}') == {"fc1": 2e-3, "*": 1}
    assert parse_damping("per_layer:0.05") == "per_layer:0.05"
    with pytest.raises(argparse.ArgumentTypeError, match="not valid JSON"):
        parse_damping("[1e-3,")
