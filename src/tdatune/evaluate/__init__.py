"""Evaluation: LDS ground truth by real retraining, and the Linear Datamodeling Score."""

from tdatune.evaluate.groundtruth import GroundTruth, GroundTruthConfig, build_ground_truth
from tdatune.evaluate.lds import LDSResult, lds, lds_path, spearman_rows

__all__ = ["GroundTruth", "GroundTruthConfig", "LDSResult", "build_ground_truth", "lds",
           "lds_path", "spearman_rows"]
