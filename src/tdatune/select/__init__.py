"""Retraining-free lambda selection: the surrogate indicator (Algorithm 1) and the
spectrum-quantile baseline."""

from tdatune.select.quantile import quantile_lambda
from tdatune.select.surrogate import (
    Selection,
    default_lambda_grid,
    mean_indicator,
    select_lambda,
    surrogate_indicator,
)

__all__ = ["Selection", "default_lambda_grid", "mean_indicator", "quantile_lambda",
           "select_lambda", "surrogate_indicator"]
