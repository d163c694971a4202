"""DPN's routers choosing how many tokens to *select* instead of how coarsely to pool.

The Dynamic Pooling Experts of DPN (arXiv 2503.20322, sec. 3) give each sample, per stage, a router
that picks its compression. Here the experts are keep ratios: an expert keeps that share of each
grid's visual tokens, the ones the sample's last prompt token attends to most inside the stage's
layer (FastV's ranking, arXiv 2403.06764), in their original order and with their own positions.
Where the detail a question needs sits in a few tokens (a digit on a blank background), a selection
keeps it and a pooling stride averages it away; the routers still give hard questions more tokens
than easy ones.

The routers are fitted, as ``dpn.presets.fitted``'s are (``router_training="fit"``): the LLM is
fine-tuned on drawn paths, then ``dpn.router_fit`` fits each router to the training samples' LM loss
+ ``fit_flops_weight`` x FLOPs ratio under every path. The paper's gradient through the chosen
expert's probability is not offered: selection has no pooled value to scale.

Spec strings: ``select`` (keep 1 / 0.5 / 0.25 at FastV's layer K = 2) or ``select:W`` (W: the FLOPs
weight of the fit).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any


from dpn.geometry import ModelGeometry
from dpn.strategies.base import (
    Stage, StageInput, StagePlan, StrategyConfig, TokenPath, check_fraction, register_spec, register_strategy,
)
from dpn.strategies.dpn import (
    DEFAULT_FIT_FLOPS_WEIGHT, FITTED_TEMPERATURE, DPNConfig, DynamicPyramid, fit_weight_spec,
)
from dpn.strategies.fastv import FASTV_LAYER, FASTV_POSITIONS, check_layer_k
from dpn.strategies.selection import kept_count, query_attention_scores, select_top_scored

# The experts of the preset: keep every token, half of them (FastV's usual R = 50%), or a quarter.
DEFAULT_KEEP_RATIOS = (1.0, 0.5, 0.25)


@dataclass
class RoutedSelectionStage(Stage):
    """After decoder layer ``layer``, keep one of ``experts`` (shares of each grid's visual tokens,
    from the most to the fewest kept) per sample, as its router picks."""

    experts: list[float] = None  # type: ignore[assignment]  # required; checked below

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.experts:
            raise ValueError(f"routed selection stage after layer {self.layer} has no experts; give keep ratios, "
                             "e.g. [1.0, 0.5, 0.25]")
        self.experts = [check_fraction(f"keep ratio of the stage after layer {self.layer}", r) for r in self.experts]
        if any(later >= earlier for earlier, later in zip(self.experts, self.experts[1:])):
            raise ValueError(f"the keep ratios of the stage after layer {self.layer} must fall from the first to the "
                             f"last (the router bias moves toward the later ones), got {self.experts}")


@dataclass
class RoutedSelectionConfig(DPNConfig):
    """``DPNConfig``'s routers over keep ratios. Of the pooling fields, ``min_tokens_to_pool`` is read
    (a grid with fewer tokens is left as it is); ``pooling`` is not. ``router_training`` must be "fit"."""

    name = "routed_selection"
    stage_class = RoutedSelectionStage
    version_1_keys = frozenset()  # new in config version 3: no file of version 1 holds it
    router_training: str = "fit"
    probability_scale: str = "none"
    routing_loss: str = "none"
    router_temperature: float = FITTED_TEMPERATURE

    def __post_init__(self) -> None:
        if self.router_training != "fit":
            raise ValueError("routed selection fits its routers after training (router_training='fit'): there is no "
                             f"pooled value to scale by the router's probability; got {self.router_training!r}")
        super().__post_init__()

    def check_geometry(self, stages: list[RoutedSelectionStage], geometry: ModelGeometry) -> None:
        StrategyConfig.check_geometry(self, stages, geometry)  # depth only: keep ratios need no grid that divides

    def token_paths(self, stages: list[RoutedSelectionStage], grids) -> list[TokenPath]:
        paths = []
        for ratios in product(*(stage.experts for stage in stages)):
            shapes = [list(grids)]
            for ratio in ratios:
                shapes.append([selected_grid(grid, ratio, self.min_tokens_to_pool) for grid in shapes[-1]])
            paths.append(TokenPath([f"keep {r:g}" for r in ratios], shapes))
        return paths


def selected_grid(grid: tuple[int, int], ratio: float, min_tokens: int) -> tuple[int, int]:
    """A grid after keeping ``ratio`` of it: unchanged when it keeps all or is too small to route."""
    rows, cols = grid
    if ratio == 1 or rows * cols < min_tokens:
        return grid
    return 1, kept_count(rows * cols, ratio)


class RoutedSelection(DynamicPyramid):
    """Per stage, a router per sample picks a keep ratio; each grid keeps its most-attended tokens."""

    def expert_shares(self, stage: int) -> list[float]:
        return list(self.config.stages[stage].experts)

    def expert_grid(self, grid: tuple[int, int], expert: float) -> tuple[int, int]:
        return selected_grid(grid, expert, self.strategy_config.min_tokens_to_pool)

    def plan(self, stage: int, inputs: StageInput) -> StagePlan:
        plan, eligible, choice_of_sample = self.routed_plan(stage, inputs)
        ratios = self.config.stages[stage].experts
        groups: dict[tuple[int, int], list[int]] = {}
        for k in eligible:
            ratio = ratios[choice_of_sample[inputs.spans.sample[k]]]
            if ratio < 1:  # a grid that keeps every token stays as it is (no copy, no rebuild)
                size = inputs.spans.size(k)
                groups.setdefault((size, kept_count(size, ratio)), []).append(k)
        if not groups:
            return plan
        scores = query_attention_scores(self.strategy_config.name, inputs).flatten()
        return select_top_scored(plan, inputs.hidden, inputs.spans, scores, groups)


def preset(geometry: ModelGeometry, fit_flops_weight: float = DEFAULT_FIT_FLOPS_WEIGHT,
           keep_ratios: tuple[float, ...] = DEFAULT_KEEP_RATIOS, layer: int = FASTV_LAYER, **options: Any) -> dict:
    """One routed stage where FastV prunes (after layer K - 1, K = 2), experts ``keep_ratios``,
    routers fitted with ``fit_flops_weight``; positions kept (as FastV keeps them)."""
    check_layer_k("select", layer, geometry)
    return {"stages": [RoutedSelectionStage(layer - 1, experts=list(keep_ratios))],
            "strategy": RoutedSelectionConfig(fit_flops_weight=fit_flops_weight, **options),
            "positions": FASTV_POSITIONS}


register_strategy("routed_selection", RoutedSelectionConfig, RoutedSelection)
register_spec("select", fit_weight_spec("select", preset), "select[:W] (DPN's fitted routers choosing FastV-ranked keep ratios 1 / 0.5 / "
              f"0.25; W: FLOPs weight, default {DEFAULT_FIT_FLOPS_WEIGHT})", plot_style="C1D-")
