"""DPN's routers choosing, per sample, between pooling a grid and selecting its tokens.

The Dynamic Pooling Experts of DPN (arXiv 2503.20322, sec. 3) pick a pooling stride per sample;
``routed_selection`` gives the routers keep ratios of a FastV-ranked selection (arXiv 2403.06764)
instead. Which kind serves better depends on the data: on dpn's synthetic benchmark pooling keeps
more accuracy per FLOP, on MNIST digits selection does (docs/RESULTS.md, docs/RESULTS_MNIST.md).
Here one stage offers both kinds of expert, ``{"pool": [kh, kw]}`` and ``{"keep": r}``, and the
fitted routers (``router_training="fit"``, see ``dpn.router_fit``) pick, per sample, the one of
least predicted LM loss + ``fit_flops_weight`` x FLOPs ratio.

Pooled tokens stand at their window's first position and selected ones at their own (positions
"keep"). Kept tokens no longer form a 2D grid, so a stage after one that selects may only select.

Spec strings: ``mixed`` (keep all / pool 1x2 / keep 0.5 / pool 2x2 / keep 0.25 at FastV's layer
K = 2) or ``mixed:W`` (W: the FLOPs weight of the fit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Any, Union

from dpn.geometry import ModelGeometry
from dpn.strategies.base import (
    Stage, StageInput, StagePlan, TokenPath, check_fraction, register_spec, register_strategy,
)
from dpn.strategies.dpn import DEFAULT_FIT_FLOPS_WEIGHT, fit_weight_spec
from dpn.strategies.fastv import FASTV_LAYER, FASTV_POSITIONS, check_layer_k
from dpn.strategies.pooling import Grid, checked_stride, divides, pooled_grid
from dpn.strategies.routed_selection import RoutedSelection, RoutedSelectionConfig, selected_grid
from dpn.strategies.selection import kept_count, query_attention_scores, select_top_scored


@dataclass(frozen=True)
class PoolExpert:
    """Max- or average-pool each grid with windows (and stride) ``stride`` = (kh, kw)."""

    stride: Grid

    @property
    def share(self) -> float:
        return 1.0 / (self.stride[0] * self.stride[1])

    @property
    def label(self) -> str:
        return "pool {}x{}".format(*self.stride)

    def grid_after(self, grid: Grid, min_tokens: int) -> Grid:
        return pooled_grid(grid, self.stride, min_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"pool": list(self.stride)}


@dataclass(frozen=True)
class KeepExpert:
    """Keep ``ratio`` of each grid's tokens, those the sample's query attends to most (FastV's ranking)."""

    ratio: float

    @property
    def share(self) -> float:
        return self.ratio

    @property
    def label(self) -> str:
        return f"keep {self.ratio:g}"

    def grid_after(self, grid: Grid, min_tokens: int) -> Grid:
        return selected_grid(grid, self.ratio, min_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"keep": self.ratio}


Expert = Union[PoolExpert, KeepExpert]


def parse_expert(value: Any, what: str) -> Expert:
    """``value`` as an expert: a ``PoolExpert`` / ``KeepExpert``, ``{"pool": [kh, kw]}`` or ``{"keep": r}``."""
    if isinstance(value, (PoolExpert, KeepExpert)):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (kind, argument), = value.items()
        if kind == "pool":
            return PoolExpert(checked_stride(argument, f"the pooling stride of {what}"))
        if kind == "keep":
            return KeepExpert(check_fraction(f"the keep ratio of {what}", argument))
    raise ValueError(f"{what} is {value!r}: an expert is {{'pool': [kh, kw]}} (pool with that stride) or "
                     "{'keep': r} (keep that share of the tokens, the most attended)")


def pools(expert: Expert) -> bool:
    """Whether ``expert`` changes a grid by pooling it (a 1x1 stride keeps it as it is)."""
    return isinstance(expert, PoolExpert) and expert.share < 1


def selects(expert: Expert) -> bool:
    """Whether ``expert`` drops tokens by selection (keep 1 keeps the grid as it is)."""
    return isinstance(expert, KeepExpert) and expert.ratio < 1


@dataclass
class MixedExpertsStage(Stage):
    """After decoder layer ``layer``, one of ``experts`` per sample (pooling strides and keep ratios,
    from the most tokens left to the fewest), as its router picks."""

    experts: list[Expert] = None  # type: ignore[assignment]  # required; checked below

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.experts:
            raise ValueError(f"mixed-experts stage after layer {self.layer} has no experts; give some, e.g. "
                             "[{'pool': [1, 1]}, {'keep': 0.5}, {'pool': [2, 2]}]")
        self.experts = [parse_expert(e, f"expert {i} of the stage after layer {self.layer}")
                        for i, e in enumerate(self.experts)]
        shares = [e.share for e in self.experts]
        if any(later > earlier for earlier, later in zip(shares, shares[1:])):
            raise ValueError(f"the experts of the stage after layer {self.layer} must leave fewer or as many tokens "
                             f"from the first to the last (the router bias moves toward the later ones); they keep "
                             f"the shares {[round(s, 4) for s in shares]}")

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "experts": [e.to_dict() for e in self.experts]}


@dataclass
class MixedExpertsConfig(RoutedSelectionConfig):
    """``RoutedSelectionConfig`` (fitted routers; ``min_tokens_to_pool`` leaves small grids alone)
    whose experts may also pool; ``pooling`` ("max" or "avg") is how they pool."""

    name = "mixed_experts"
    stage_class = MixedExpertsStage

    def check_stages(self, stages: list[MixedExpertsStage]) -> None:
        super().check_stages(stages)
        selected_before = False
        for stage in stages:
            if selected_before and any(pools(e) for e in stage.experts):
                raise ValueError(f"the stage after layer {stage.layer} pools, but an earlier stage may have selected "
                                 "tokens, which leaves no 2D grid to pool; after a stage that selects, only select")
            selected_before = selected_before or any(selects(e) for e in stage.experts)

    def check_geometry(self, stages: list[MixedExpertsStage], geometry: ModelGeometry) -> None:
        super().check_geometry(stages, geometry)
        for grid in geometry.image_grids or ():
            for experts in product(*(stage.experts for stage in stages)):
                current = grid
                for stage, expert in zip(stages, experts):
                    if isinstance(expert, PoolExpert) and not divides(current, expert.stride, self.min_tokens_to_pool):
                        raise ValueError(f"expert {expert.label} of the stage after layer {stage.layer} does not divide "
                                         f"the {current[0]}x{current[1]} grid that the model's {grid[0]}x{grid[1]} grid "
                                         "can be by then; choose strides that divide it")
                    current = expert.grid_after(current, self.min_tokens_to_pool)

    def token_paths(self, stages: list[MixedExpertsStage], grids) -> list[TokenPath]:
        paths = []
        for experts in product(*(stage.experts for stage in stages)):
            shapes = [list(grids)]
            for expert in experts:
                shapes.append([expert.grid_after(grid, self.min_tokens_to_pool) for grid in shapes[-1]])
            paths.append(TokenPath([e.label for e in experts], shapes))
        return paths


class MixedExperts(RoutedSelection):
    """Per stage, a router per sample picks an expert: its grids are pooled or their most-attended
    tokens kept."""

    def expert_shares(self, stage: int) -> list[float]:
        return [e.share for e in self.config.stages[stage].experts]

    def expert_grid(self, grid: Grid, expert: Expert) -> Grid:
        return expert.grid_after(grid, self.strategy_config.min_tokens_to_pool)

    def bias_scales(self, stage: int) -> list[float]:
        """Without ``expert_scales``: log2 of the compression (keep all 0, a half 1, a quarter 2), so
        the router bias moves experts that keep as many tokens alike (the index would favour one
        kind) and, for strides and ratios of powers of two, as the other routers' index does."""
        if self.strategy_config.expert_scales is not None:
            return super().bias_scales(stage)
        return [-math.log2(share) for share in self.expert_shares(stage)]

    def plan(self, stage: int, inputs: StageInput) -> StagePlan:
        plan, eligible, choice_of_sample = self.routed_plan(stage, inputs)
        experts = self.config.stages[stage].experts
        stride_of_span: dict[int, Grid] = {}
        selections: dict[tuple[int, int], list[int]] = {}
        for k in eligible:
            expert = experts[choice_of_sample[inputs.spans.sample[k]]]
            if pools(expert):
                stride_of_span[k] = expert.stride
            elif selects(expert):
                size = inputs.spans.size(k)
                selections.setdefault((size, kept_count(size, expert.ratio)), []).append(k)
        plan = self.pool_spans(plan, inputs, stride_of_span)
        if not selections:
            return plan
        scores = query_attention_scores(self.strategy_config.name, inputs).flatten()
        return select_top_scored(plan, inputs.hidden, inputs.spans, scores, selections)


# The preset's experts: every token, then for a half and a quarter of them, pooling before selecting.
DEFAULT_EXPERTS = (PoolExpert((1, 1)), PoolExpert((1, 2)), KeepExpert(0.5), PoolExpert((2, 2)), KeepExpert(0.25))


def preset(geometry: ModelGeometry, fit_flops_weight: float = DEFAULT_FIT_FLOPS_WEIGHT,
           experts: tuple[Any, ...] = DEFAULT_EXPERTS, layer: int = FASTV_LAYER, **options: Any) -> dict:
    """One routed stage where FastV prunes (after layer K - 1, K = 2) with ``experts`` (pooling strides
    that do not divide the model's fixed grids are left out), routers fitted with ``fit_flops_weight``;
    positions kept."""
    check_layer_k("mixed", layer, geometry)
    min_tokens = options.get("min_tokens_to_pool", MixedExpertsConfig.min_tokens_to_pool)
    parsed = [parse_expert(e, "an expert of the mixed preset") for e in experts]
    usable = [e for e in parsed if not isinstance(e, PoolExpert)
              or all(divides(grid, e.stride, min_tokens) for grid in geometry.image_grids or ())]
    return {"stages": [MixedExpertsStage(layer - 1, experts=usable)],
            "strategy": MixedExpertsConfig(fit_flops_weight=fit_flops_weight, **options),
            "positions": FASTV_POSITIONS}


register_strategy("mixed_experts", MixedExpertsConfig, MixedExperts)
register_spec("mixed", fit_weight_spec("mixed", preset), "mixed[:W] (DPN's fitted routers choosing, per sample, keep all / "
              f"pool 1x2 / keep 0.5 / pool 2x2 / keep 0.25; W: FLOPs weight, default {DEFAULT_FIT_FLOPS_WEIGHT})",
              plot_style="C2P-")
