"""Retraining-free lambda selection: the surrogate indicator (Algorithm 1), the default rule
(``choose_lambda``), the reliability of a selection and the spectrum-quantile baseline."""

from tdatune.select.default import DEFAULT_RULE, RULES, choose_lambda
from tdatune.select.quantile import quantile_lambda
from tdatune.select.surrogate import (
    Selection,
    default_lambda_grid,
    mean_indicator,
    select_lambda,
    surrogate_indicator,
)

__all__ = ["DEFAULT_RULE", "RULES", "Selection", "choose_lambda", "default_lambda_grid",
           "mean_indicator", "quantile_lambda", "select_lambda", "surrogate_indicator"]
