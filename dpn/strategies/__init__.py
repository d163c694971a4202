"""Compression strategies; each plans, per stage, which new tokens replace which images."""

from dpn.strategies.base import StagePlan
from dpn.strategies.dpn import DynamicPyramid, Router

__all__ = ["DynamicPyramid", "Router", "StagePlan"]
