"""Input checks name the offending example and the fix."""

from __future__ import annotations

import pytest
import torch

from tdatune.utils.checks import check_finite_rows, check_positive_lambdas


@pytest.mark.parametrize("bad,row", [(float("nan"), 3), (float("inf"), 1), (-float("inf"), 0)])
def test_non_finite_row_is_named_with_offset(bad, row):
    m = torch.randn(5, 40)
    m[row, 7] = bad
    with pytest.raises(ValueError, match=f"example {row + 100}"):
        check_finite_rows("gradients", m, offset=100)


def test_finite_rows_pass_and_inf_minus_inf_is_caught():
    check_finite_rows("gradients", torch.randn(4, 10))
    m = torch.randn(4, 10)
    m[2, 0], m[2, 1] = float("inf"), -float("inf")
    with pytest.raises(ValueError, match="example 2"):
        check_finite_rows("gradients", m)


def test_lambdas_must_be_positive_and_finite():
    assert check_positive_lambdas([1e-3, 2.0]).dtype == torch.float64
    for bad in ([], [0.0], [1.0, -2.0], [float("inf")]):
        with pytest.raises(ValueError):
            check_positive_lambdas(bad)
