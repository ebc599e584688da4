"""Curvature: the empirical Fisher and its eigensystem (parameter or kernel form)."""

from tdatune.curvature.eigen import Eigensystem, fisher_eigensystem

__all__ = ["Eigensystem", "fisher_eigensystem"]
