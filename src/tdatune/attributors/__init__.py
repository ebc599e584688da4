"""Attributors behind one protocol, and the lambda-path."""

from tdatune.attributors.base import AttributionContext, Attributor, HyperParameter
from tdatune.attributors.if_cg import IFCG
from tdatune.attributors.if_explicit import IFExplicit
from tdatune.attributors.if_lissa import IFLiSSA, LiSSADivergence
from tdatune.attributors.iffim import IFFIM
from tdatune.attributors.lambda_path import EnsembleLambdaPath, LambdaPath
from tdatune.attributors.logra import LoGra
from tdatune.attributors.registry import ATTRIBUTORS, make_attributor
from tdatune.attributors.tracin import TracIn
from tdatune.attributors.trak import TRAK

__all__ = ["ATTRIBUTORS", "IFCG", "IFFIM", "TRAK", "AttributionContext", "Attributor",
           "EnsembleLambdaPath", "HyperParameter", "IFExplicit", "IFLiSSA", "LambdaPath",
           "LiSSADivergence", "LoGra", "TracIn", "make_attributor"]
