"""The default-rule front end: each rule's lambda by hand, Algorithm 1's diagnostics kept."""

import pytest
import torch

from tdatune.select import choose_lambda, select_lambda


def spectrum():
    g = torch.Generator().manual_seed(0)
    sigma = torch.logspace(-6, 1, 40, dtype=torch.float64)
    c = torch.randn(7, 40, generator=g, dtype=torch.float64)
    return sigma, c


def test_top_rule_is_a_hundredth_of_the_largest_eigenvalue():
    sigma, c = spectrum()
    sel = choose_lambda(sigma, c, rule="top")
    assert sel.lam == pytest.approx(0.01 * 10.0)
    assert sel.rule == "top" and sel.status == "spectrum"
    xi = select_lambda(sigma, c)
    assert sel.xi_lambda == pytest.approx(xi.lam)
    assert sel.reliability is not None and sel.to_dict()["xi_lambda"] == pytest.approx(xi.lam)


def test_quantile_rule_is_the_spectrum_quantile():
    sigma, c = spectrum()
    sel = choose_lambda(sigma, c, rule="quantile")
    # 40 eigenvalues log-spaced over 7 decades: the 0.9 quantile by linear interpolation
    # between the 36th and 37th (0-based 35.1)
    pos = 0.9 * 39
    lo = float(sigma[int(pos)])
    hi = float(sigma[int(pos) + 1])
    assert sel.lam == pytest.approx(lo + (pos - int(pos)) * (hi - lo))
    assert sel.rule == "quantile"


def test_xi_rule_is_algorithm_one():
    sigma, c = spectrum()
    for t in (0.3, 0.5, 0.7):
        assert choose_lambda(sigma, c, rule="xi", threshold=t).lam == \
            pytest.approx(select_lambda(sigma, c, threshold=t).lam)


def test_an_unknown_rule_is_refused():
    sigma, c = spectrum()
    with pytest.raises(ValueError, match="selection rule"):
        choose_lambda(sigma, c, rule="median")


def test_reliability_distance_is_between_xi_and_the_spectrum_quantile():
    import math

    import numpy as np

    sigma, c = spectrum()
    sel = choose_lambda(sigma, c)
    q90 = float(np.quantile(sigma.numpy(), 0.9))  # every eigenvalue is non-zero here
    assert sel.rule == "quantile" and sel.lam == pytest.approx(q90)
    assert sel.reliability.distance == pytest.approx(abs(math.log10(sel.xi_lambda / q90)))
    assert sel.reliability.unsure == (sel.reliability.distance > 1.0)


def test_several_thresholds_at_once_match_the_exact_path_for_each():
    from tdatune.select.surrogate import _select_lambda_exact, select_lambdas

    sigma, c = spectrum()
    many = select_lambdas(sigma, c, [0.3, 0.5, 0.7])
    for t, sel in zip((0.3, 0.5, 0.7), many, strict=True):
        exact = _select_lambda_exact(sigma, c, threshold=t)
        assert sel.threshold == t and sel.lam == pytest.approx(exact.lam, rel=1e-6)
        assert sel.reliability is not None
