"""Compression strategies, one file each, registered by name (``dpn.strategies.base``).

Built in: ``dpn`` (the paper's routers), ``static``, ``random``, ``projector`` (pooling peers and
ablations), ``fastv``, ``pdrop``, ``dart``, ``divprune``, ``vispruner``, ``visionzip``, ``sparsevlm`` and ``cdpruner`` (token
selection),
``routed_selection`` (DPN's routers choosing keep ratios of a FastV-ranked selection), ``mixed_experts`` (DPN's
routers choosing between pooling strides and keep ratios). A new method is one file that
defines its stage, config and module and calls ``register_strategy`` (and ``register_spec`` for a
``--pyramid`` spec string); import it before building its configs.
"""

from dpn.strategies.base import (
    Stage, StageInput, StagePlan, Strategy, StrategyConfig, TokenCounts, TokenPath, register_spec, register_strategy,
    registered_strategies, strategy_entry,
)
from dpn.strategies import (  # noqa: F401
    cdpruner, dart, divprune, dpn, fastv, mixed_experts, pdrop, projector, random_experts, routed_selection, sparsevlm, static,
    visionzip, vispruner,
)
from dpn.strategies.cdpruner import CDPrunerConfig
from dpn.strategies.dart import DARTConfig
from dpn.strategies.divprune import DivPruneConfig
from dpn.strategies.dpn import DPNConfig, DynamicPyramid, Router
from dpn.strategies.fastv import FastVConfig
from dpn.strategies.mixed_experts import KeepExpert, MixedExperts, MixedExpertsConfig, MixedExpertsStage, PoolExpert
from dpn.strategies.pdrop import PDropConfig
from dpn.strategies.pooling import GridPooling, PoolingConfig, PoolingStage
from dpn.strategies.projector import ProjectorConfig
from dpn.strategies.random_experts import RandomConfig, RandomPooling
from dpn.strategies.routed_selection import RoutedSelection, RoutedSelectionConfig, RoutedSelectionStage
from dpn.strategies.selection import AttentionSelection, SelectionConfig, SelectionStage
from dpn.strategies.sparsevlm import SparseVLMConfig
from dpn.strategies.static import StaticConfig, StaticPooling
from dpn.strategies.visionzip import VisionZipConfig
from dpn.strategies.vispruner import VisPrunerConfig

__all__ = [
    "AttentionSelection", "CDPrunerConfig", "DARTConfig", "DPNConfig", "DivPruneConfig", "DynamicPyramid", "FastVConfig", "GridPooling", "KeepExpert",
    "MixedExperts", "MixedExpertsConfig", "MixedExpertsStage", "PDropConfig", "PoolExpert",
    "PoolingConfig", "PoolingStage", "ProjectorConfig", "RandomConfig", "RandomPooling", "RoutedSelection", "RoutedSelectionConfig",
    "RoutedSelectionStage", "Router", "SelectionConfig",
    "SelectionStage", "SparseVLMConfig", "Stage", "StageInput", "StagePlan", "StaticConfig", "StaticPooling", "Strategy",
    "StrategyConfig", "TokenCounts", "TokenPath", "VisionZipConfig", "VisPrunerConfig", "register_spec", "register_strategy", "registered_strategies",
    "strategy_entry",
]
