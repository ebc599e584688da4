"""Data sets: containers, deterministic splits and loaders for real files."""

from tdatune.data.base import ArrayDataset, Splits, as_dataset, make_splits
from tdatune.data.streaming import StreamingDataset, stream_dataset

__all__ = ["ArrayDataset", "Splits", "StreamingDataset", "as_dataset", "make_splits",
           "stream_dataset"]
