"""Compression strategies; each plans, per stage, which new tokens replace which images.

``build_strategy`` maps a config's ``strategy`` name to its class (see ``dpn.config``).
"""

from dpn.config import PyramidConfig
from dpn.strategies.base import StageInput, StagePlan, Strategy
from dpn.strategies.dpn import BudgetInputs, DynamicPyramid, Router
from dpn.strategies.pooling import GridPooling, RandomPooling, StaticPooling
from dpn.strategies.selection import AttentionSelection

STRATEGY_CLASSES = {
    "dpn": DynamicPyramid,
    "static": StaticPooling,
    "projector": StaticPooling,
    "random": RandomPooling,
    "fastv": AttentionSelection,
    "pdrop": AttentionSelection,
}


def build_strategy(config: PyramidConfig, hidden_size: int) -> Strategy:
    """The strategy module for ``config`` (only ``dpn`` has weights: its routers)."""
    if config.strategy == "dpn":
        return DynamicPyramid(config, hidden_size)
    return STRATEGY_CLASSES[config.strategy](config)


__all__ = [
    "AttentionSelection", "BudgetInputs", "DynamicPyramid", "GridPooling", "RandomPooling", "Router", "StageInput",
    "StagePlan", "StaticPooling", "Strategy", "build_strategy",
]
