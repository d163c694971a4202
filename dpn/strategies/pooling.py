"""Grid pooling: the part shared by DPN and its pooling peers (static, random, projector).

Each stage lists ``experts``: pooling windows ``(kh, kw)`` that are also their strides, ``(1, 1)``
keeping every token. At a stage every grid of a sample's images is pooled on its 2D layout with
the stride chosen for that sample (``GridPooling.choose``: a router, a fixed stride, a draw). A
grid smaller than ``min_tokens_to_pool`` is left as it is; a stride that does not divide a grid
pools its remainder row / column as smaller windows (fixed grids are checked at ``apply_pyramid``
instead, so there a non-dividing stride is an error).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from itertools import product

import torch

from dpn.geometry import ModelGeometry
from dpn.spans import pool_grid, window_origins
from dpn.strategies.base import (
    Stage, StageInput, StagePlan, Strategy, StrategyConfig, TokenPath, check_choice, check_int,
)
from dpn.strategies.schedule import paper_stage_layers
from dpn.transfer import host_tensor

Grid = tuple[int, int]
POOLING_FUNCTIONS = ("max", "avg")
# The paper: samples with fewer than 16 visual tokens are not pooled.
PAPER_MIN_TOKENS = 16
# Expert set of the paper's released training script: keep, halve, quarter.
PAPER_EXPERTS = ((1, 1), (1, 2), (2, 2))


@dataclass
class PoolingStage(Stage):
    """A pooling stage: after decoder layer ``layer``, pool with one of ``experts`` (kh, kw)."""

    experts: list[tuple[int, int]] = None  # type: ignore[assignment]  # required; checked below

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.experts:
            raise ValueError(f"stage after layer {self.layer} has no experts; give at least one (kh, kw) stride")
        self.experts = [checked_stride(expert, f"expert of the stage after layer {self.layer}")
                        for expert in self.experts]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "experts": [list(e) for e in self.experts]}

    @classmethod
    def from_dict(cls, data):
        if isinstance(data, dict) and "keep_ratio" in data:
            raise ValueError("a pooling stage is {layer, experts}; keep_ratio is for the token-selection strategies")
        return super().from_dict(data)


def checked_stride(stride, what: str) -> Grid:
    """``stride`` as a (kh, kw) pair of positive ints (an int k means (k, k)), or a ValueError that
    names ``what`` it is: a zero or negative stride would divide by zero or pool nothing."""
    if isinstance(stride, int) and not isinstance(stride, bool):
        stride = (stride, stride)
    if (not isinstance(stride, (list, tuple)) or len(stride) != 2
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in stride)):
        raise ValueError(f"{what} is {stride!r}: a stride must be a pair of positive ints (kh, kw), e.g. (2, 2)")
    return int(stride[0]), int(stride[1])


# ---------------------------------------------------------------------------- grid arithmetic
def divides(grid: Grid, expert: Grid, min_tokens: int) -> bool:
    if grid[0] * grid[1] < min_tokens:
        return True  # too small to pool: left as it is
    return grid[0] % expert[0] == 0 and grid[1] % expert[1] == 0


def pooled_grid(grid: Grid, expert: Grid, min_tokens: int) -> Grid:
    """Grid after pooling with ``expert``; grids below ``min_tokens`` are not pooled, and a stride
    that does not divide a grid pools the remainder row / column as one more (smaller) window."""
    if grid[0] * grid[1] < min_tokens:
        return grid
    return -(-grid[0] // expert[0]), -(-grid[1] // expert[1])


def reachable_grids(grid: Grid, stages: list[PoolingStage], min_tokens: int) -> set[Grid]:
    """Every grid a grid can become after ``stages``, over all routing paths (paths that divide)."""
    grids = {grid}
    for stage in stages:
        grids = {pooled_grid(g, e, min_tokens) for g, e in product(grids, stage.experts) if divides(g, e, min_tokens)}
    return grids


def grids_after(grid: Grid, path: list[Grid], min_tokens: int) -> list[Grid]:
    """The shape of one grid before the first stage and after each stage of ``path``."""
    shapes = [grid]
    for expert in path:
        shapes.append(pooled_grid(shapes[-1], expert, min_tokens))
    return shapes


def visual_tokens_after(grid: Grid, path: list[Grid], min_tokens: int) -> list[int]:
    """Visual tokens of one grid before the first stage and after each stage of ``path``."""
    return [rows * cols for rows, cols in grids_after(grid, path, min_tokens)]


def dividing_stages(grids: tuple[Grid, ...], layers: list[int], experts: list[Grid], min_tokens: int,
                    keep_single: bool = False) -> list[PoolingStage]:
    """Stages at ``layers`` with the ``experts`` that divide every grid reachable there; a stage left
    with nothing (or, unless ``keep_single``, with only 1x1) is dropped. Makes presets valid for any grid."""
    experts = [checked_stride(expert, "a pooling stride") for expert in experts]
    stages: list[PoolingStage] = []
    for layer in layers:
        reachable = [g for grid in grids for g in reachable_grids(grid, stages, min_tokens)]
        usable = [e for e in experts if all(divides(g, e, min_tokens) for g in reachable)]
        if usable and (keep_single or usable != [(1, 1)]):  # a stage that can only keep everything does nothing
            stages.append(PoolingStage(layer=layer, experts=usable))
    return stages


def paper_pooling_stages(geometry: ModelGeometry, min_tokens: int = PAPER_MIN_TOKENS) -> list[PoolingStage]:
    """The paper's stages (1/4, 1/2, 3/4 of depth; experts keep / 1x2 / 2x2), without what would
    not divide the model's fixed grids on some routing path. Families whose grids vary per image
    keep every expert: a stride that does not divide a grid pools its remainder (``pool_grid``)."""
    layers = paper_stage_layers(geometry.num_layers)
    if geometry.image_grids is None:
        return [PoolingStage(layer, list(PAPER_EXPERTS)) for layer in layers]
    return dividing_stages(geometry.image_grids, layers, list(PAPER_EXPERTS), min_tokens)


# ------------------------------------------------------------------------------------- config
@dataclass
class PoolingConfig(StrategyConfig):
    """Shared by the pooling strategies.

    Attributes:
        pooling: ``"max"`` (the paper's choice) or ``"avg"`` pooling of each window.
        min_tokens_to_pool: a grid with fewer tokens than this at a stage is left as it is.
    """

    stage_class = PoolingStage
    version_1_keys = frozenset({"pooling", "min_tokens_to_pool"})
    pooling: str = "max"
    min_tokens_to_pool: int = PAPER_MIN_TOKENS

    def __post_init__(self) -> None:
        check_choice("pooling", self.pooling, POOLING_FUNCTIONS)
        check_int("min_tokens_to_pool", self.min_tokens_to_pool, 0)

    def check_geometry(self, stages: list[PoolingStage], geometry: ModelGeometry) -> None:
        super().check_geometry(stages, geometry)
        for grid in geometry.image_grids or ():  # grids known only per call are checked by the runtime
            stages_so_far: list[PoolingStage] = []
            for stage in stages:
                for g in reachable_grids(grid, stages_so_far, self.min_tokens_to_pool):
                    for expert in stage.experts:
                        if not divides(g, expert, self.min_tokens_to_pool):
                            raise ValueError(
                                f"expert {expert} of the stage after layer {stage.layer} does not divide the "
                                f"{g[0]}x{g[1]} visual grid that earlier stages can produce from the model's "
                                f"{grid[0]}x{grid[1]} grid; choose strides that divide every reachable grid"
                            )
                stages_so_far.append(stage)

    def token_paths(self, stages: list[PoolingStage], grids: tuple[Grid, ...]) -> list[TokenPath]:
        paths = []
        for path in product(*(stage.experts for stage in stages)):
            per_grid = [grids_after(grid, list(path), self.min_tokens_to_pool) for grid in grids]
            paths.append(TokenPath(["x".join(map(str, e)) for e in path], [list(s) for s in zip(*per_grid)]))
        return paths


# ------------------------------------------------------------------------------------- module
class GridPooling(Strategy):
    """Pools every grid of a sample with the stride ``choose`` picks for the sample."""

    @abstractmethod
    def choose(self, stage: int, inputs: StageInput, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert probabilities (n, E) in fp32 and the chosen expert (n,) for the rows ``samples``."""

    def num_choices(self, stage: int) -> int:
        return len(self.config.stages[stage].experts)

    def routed_plan(self, stage: int, inputs: StageInput) -> tuple[StagePlan, list[int], dict[int, int]]:
        """The plan with every choice recorded but no tokens yet, the spans whose grids are big enough
        to compress (``min_tokens_to_pool``), and the expert chosen (or forced) for each of their samples."""
        spans = inputs.spans
        device = inputs.hidden.device
        eligible = [k for k in range(len(spans)) if spans.size(k) >= self.strategy_config.min_tokens_to_pool]
        plan = StagePlan.unrouted(inputs.hidden.shape[0], self.num_choices(stage), device)
        if not eligible:
            return plan, eligible, {}
        samples = sorted({spans.sample[k] for k in eligible})
        routed = host_tensor(samples, device)
        probs, choice = self.choose(stage, inputs, routed)
        if inputs.forced is not None:
            choice = torch.where(inputs.forced[routed] >= 0, inputs.forced[routed], choice)
        chosen_probability = probs.gather(1, choice[:, None]).squeeze(1)
        plan.experts = plan.experts.index_copy(0, routed, choice)
        plan.expert_probability = plan.expert_probability.index_copy(0, routed, chosen_probability)
        plan.router_probs = plan.router_probs.index_copy(0, routed, probs)
        plan.routed = plan.routed.index_fill(0, routed, True)
        return plan, eligible, dict(zip(samples, choice.tolist()))

    def plan(self, stage: int, inputs: StageInput) -> StagePlan:
        """Choose an expert for every sample with a poolable grid and pool its grids with it."""
        experts = self.config.stages[stage].experts
        plan, eligible, choice_of_sample = self.routed_plan(stage, inputs)
        stride_of_span = {k: experts[choice_of_sample[inputs.spans.sample[k]]] for k in eligible}
        return self.pool_spans(plan, inputs, stride_of_span)

    def pool_spans(self, plan: StagePlan, inputs: StageInput, stride_of_span: dict[int, Grid]) -> StagePlan:
        """Add to ``plan`` each grid of ``stride_of_span`` (span index -> stride) pooled with its stride,
        scaled by its sample's ``token_scale``; a 1x1 stride without a scale leaves its grid as it is."""
        hidden, spans = inputs.hidden, inputs.spans
        batch, seq_len, width = hidden.shape
        device = hidden.device
        scale = self.token_scale(plan.expert_probability)
        groups: dict[tuple[int, int, int, int], list[int]] = {}
        for k, kernel in stride_of_span.items():
            if tuple(kernel) == (1, 1) and scale is None:
                continue  # kept as it is: the layout does not change (no copy, no rebuild)
            groups.setdefault((spans.rows[k], spans.cols[k], *kernel), []).append(k)
        flat = hidden.reshape(batch * seq_len, width)
        for (n_rows, n_cols, kh, kw), members in groups.items():
            index = spans.token_index(members, seq_len, device).view(len(members), n_rows * n_cols)
            tokens = flat[index].view(len(members), n_rows, n_cols, width)
            pooled = pool_grid(tokens, (kh, kw), self.strategy_config.pooling).reshape(len(members), -1, width)
            if scale is not None:
                member_samples = host_tensor([spans.sample[k] for k in members], device)
                pooled = pooled * scale[member_samples].to(pooled.dtype)[:, None, None]
            origins = window_origins(n_rows, n_cols, (kh, kw), device)
            plan.extend(members, pooled_grid((n_rows, n_cols), (kh, kw), 0), pooled.reshape(-1, width),
                        index[:, origins].flatten(),  # each window's first (top-left) token
                        index.flatten())
        return plan

    def token_scale(self, probability: torch.Tensor) -> torch.Tensor | None:
        """Per-sample factor for the pooled tokens given the chosen experts' probabilities (the
        routers' gradient path), or None to leave them unscaled (no router to train)."""
        return None


def parse_stride(spec: str, argument: str | None) -> Grid:
    """The ``KHxKW`` after ``name:`` in a spec."""
    try:
        kh, kw = (int(k) for k in (argument or "").lower().split("x"))
    except ValueError as err:
        raise ValueError(f"pyramid spec {spec!r}: the stride must look like 2x2") from err
    return checked_stride((kh, kw), f"the stride of pyramid spec {spec!r}")
