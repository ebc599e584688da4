"""Data sets: containers, deterministic splits and loaders for real files."""

from tdatune.data.base import ArrayDataset, Splits, as_dataset, make_splits

__all__ = ["ArrayDataset", "Splits", "as_dataset", "make_splits"]
