"""Attributors behind one protocol, and the lambda-path."""

from tdatune.attributors.base import AttributionContext, Attributor, HyperParameter
from tdatune.attributors.iffim import IFFIM
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.attributors.registry import ATTRIBUTORS, make_attributor

__all__ = ["ATTRIBUTORS", "IFFIM", "AttributionContext", "Attributor", "HyperParameter",
           "LambdaPath", "make_attributor"]
