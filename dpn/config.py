"""Configuration of a Dynamic Pyramid Network (DPN, arXiv 2503.20322) and of its peers.

A :class:`PyramidConfig` says which compression ``strategy`` runs, where the LLM compresses its
visual tokens (``stages``), what each stage may do (pooling strides ``experts``, or a
``keep_ratio`` of tokens to keep), and how the router and its loss behave. It is a plain
dataclass saved as ``pyramid_config.json`` beside the strategy's weights (the routers, if any).

Strategies (``dpn.strategies``):

- ``dpn``: per-sample routers pick a pooling stride per stage (the paper's method);
- ``static``: the same stages with one fixed stride each (the paper's static ablation);
- ``random``: the DPN experts chosen uniformly at random (ablation);
- ``projector``: one fixed pooling of the visual grid before the first decoder layer (layer -1),
  the direct-compression family the paper argues against;
- ``fastv``: after one layer, keep the visual tokens that the last prompt token attends to most
  (FastV, arXiv 2403.06764);
- ``pdrop``: the same ranking at several stages, each keeping a ratio of what is left
  (PyramidDrop, arXiv 2410.17247).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from itertools import product
from pathlib import Path
from typing import Any

CONFIG_NAME = "pyramid_config.json"
CONFIG_VERSION = 1

POOLING_FUNCTIONS = ("max", "avg")
ROUTER_INPUTS = ("last_prompt_token", "router_token")
POSITION_MODES = ("renumber", "keep")
ROUTING_LOSSES = ("hinge", "budget", "none")
# How scale_by_probability applies the chosen expert's probability p to the pooled tokens:
# "value" multiplies them by p (the paper), "straight_through" by p / stop_gradient(p), which
# leaves every value as it is and still gives the router the gradient through p; "train_only"
# multiplies by p while training and not at inference.
PROBABILITY_SCALES = ("value", "straight_through", "train_only")
POOLING_STRATEGIES = ("dpn", "static", "random", "projector")
SELECTION_STRATEGIES = ("fastv", "pdrop")
STRATEGIES = POOLING_STRATEGIES + SELECTION_STRATEGIES
# The projector strategy compresses before the first decoder layer.
BEFORE_FIRST_LAYER = -1
# FastV's defaults (arXiv 2403.06764): prune after layer K = 2, keeping R = 50% of the visual tokens.
FASTV_LAYER = 2
FASTV_KEEP_RATIO = 0.5
# PyramidDrop's default ratio per stage (arXiv 2410.17247), at DPN's stage depths.
PDROP_KEEP_RATIO = 0.5

# The paper's schedule for a 32-layer LLM pools after layers 8, 16 and 24: at these fractions of depth.
PAPER_STAGE_FRACTIONS = (0.25, 0.5, 0.75)
# Expert set of the paper's released training script: keep, halve, quarter.
PAPER_EXPERTS = ((1, 1), (1, 2), (2, 2))
PAPER_TEMPERATURE = 10.0
PAPER_MIN_TOKENS = 16
PAPER_LOSS_TARGET = 1.5
PAPER_LOSS_WEIGHT = 1e-3
# Router bottleneck: Linear(d, d / 4).
PAPER_ROUTER_REDUCTION = 4


@dataclass
class PyramidStage:
    """One compression point, after decoder layer ``layer`` (0-indexed; -1: before the first layer).

    A pooling stage lists ``experts``: pooling windows ``(kh, kw)`` that are also their strides,
    ``(1, 1)`` keeping every token. A selection stage (fastv, pdrop) gives ``keep_ratio`` instead:
    the fraction of each image's remaining visual tokens it keeps.
    """

    layer: int
    experts: list[tuple[int, int]] | None = None
    keep_ratio: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"stage layer must be an int, got {self.layer!r}")
        if self.keep_ratio is not None:
            if self.experts is not None:
                raise ValueError(f"stage after layer {self.layer} has both experts and keep_ratio; give one")
            if not 0 < self.keep_ratio <= 1:
                raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
            self.keep_ratio = float(self.keep_ratio)
            return
        if not self.experts:
            raise ValueError(
                f"stage after layer {self.layer} has no experts; give at least one (kh, kw) stride (or a keep_ratio)"
            )
        experts = []
        for expert in self.experts:
            if isinstance(expert, int):
                expert = (expert, expert)
            if len(expert) != 2 or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in expert):
                raise ValueError(f"expert {expert!r} must be a pair of positive ints (kh, kw)")
            experts.append((int(expert[0]), int(expert[1])))
        self.experts = experts


@dataclass
class PyramidConfig:
    """Everything that defines a pyramid, independent of the model's weights.

    Attributes:
        stages: compression points in increasing layer order.
        strategy: one of ``STRATEGIES`` (see the module docstring).
        pooling: ``"max"`` (the paper's choice) or ``"avg"`` pooling of each window.
        router_input: the hidden state the router reads: ``"last_prompt_token"`` (the token just
            before the answer) or ``"router_token"`` (the last occurrence of ``router_token_id``).
        router_token_id: token id of a dedicated ``<ROUTER>`` token (only with ``router_token``).
        router_temperature: probabilities are ``softmax(logits / router_temperature)``.
        sample_in_training: in training mode, sample the expert from the router's probabilities;
            otherwise (and always at inference) take the argmax.
        scale_by_probability: multiply the pooled tokens by the chosen expert's probability (the
            router's gradient path; applied at inference too so train and test match).
        probability_scale: ``"value"`` (the paper: tokens x p), ``"straight_through"`` (tokens x
            p / stop_gradient(p): the same values as without scaling, the same gradient path) or
            ``"train_only"`` (tokens x p in training mode, unscaled at inference).
        min_tokens_to_pool: an image with fewer tokens than this at a stage is left as it is.
        positions: ``"renumber"`` gives the shortened sequence consecutive rotary positions (as in the
            paper); ``"keep"`` gives each pooled token the position of its window's first token.
        routing_loss: ``"hinge"`` (the paper's loss), ``"budget"`` (the batch's expected LLM FLOPs
            ratio under the router's probabilities is pulled toward ``budget_target``) or ``"none"``.
        routing_loss_weight: total loss = LM loss + weight * routing loss.
        routing_loss_target: the hinge's target for the mean confident compression per stage.
        budget_target: the FLOPs fraction of the vanilla LLM the ``budget`` loss aims at.
        router_bias: added to every stage's router log-probabilities times the expert's scale
            (``expert_scales``): > 0 favours stronger compression, < 0 weaker. The inference-time
            budget knob; ``dpn.calibrate_router_bias`` picks it for a target FLOPs ratio.
        group_by_length: after a stage, run samples of similar length together (prefill and
            training), so one sample that kept every token does not set the length for the batch.
            Results are the same either way; only speed differs.
        expert_scales: compression level of each expert (default: its index, i.e. 0, 1, 2, ...).
        router_reduction: the router's hidden width is ``hidden_size // router_reduction``.
    """

    stages: list[PyramidStage]
    strategy: str = "dpn"
    pooling: str = "max"
    router_input: str = "last_prompt_token"
    router_token_id: int | None = None
    router_temperature: float = PAPER_TEMPERATURE
    sample_in_training: bool = True
    scale_by_probability: bool = True
    probability_scale: str = "value"
    min_tokens_to_pool: int = PAPER_MIN_TOKENS
    positions: str = "renumber"
    routing_loss: str = "hinge"
    routing_loss_weight: float = PAPER_LOSS_WEIGHT
    routing_loss_target: float = PAPER_LOSS_TARGET
    expert_scales: list[list[float]] | None = None
    router_reduction: int = PAPER_ROUTER_REDUCTION
    budget_target: float | None = None
    router_bias: float = 0.0
    group_by_length: bool = True
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, PyramidStage) else PyramidStage(**s) for s in self.stages]
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("pooling", self.pooling, POOLING_FUNCTIONS)
        _check_choice("router_input", self.router_input, ROUTER_INPUTS)
        _check_choice("positions", self.positions, POSITION_MODES)
        _check_choice("routing_loss", self.routing_loss, ROUTING_LOSSES)
        _check_choice("probability_scale", self.probability_scale, PROBABILITY_SCALES)
        if not self.stages:
            raise ValueError("a pyramid needs at least one stage")
        layers = [s.layer for s in self.stages]
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"stage layers must be strictly increasing, got {layers}")
        if self.router_input == "router_token" and self.router_token_id is None:
            raise ValueError("router_input='router_token' needs router_token_id (the id of your <ROUTER> token)")
        if not self.router_temperature > 0:
            raise ValueError(f"router_temperature must be > 0, got {self.router_temperature}")
        if self.min_tokens_to_pool < 0:
            raise ValueError(f"min_tokens_to_pool must be >= 0, got {self.min_tokens_to_pool}")
        if self.router_reduction < 1:
            raise ValueError(f"router_reduction must be >= 1, got {self.router_reduction}")
        if self.expert_scales is not None:
            if len(self.expert_scales) != len(self.stages) or any(
                len(sc) != len(st.experts) for sc, st in zip(self.expert_scales, self.stages)
            ):
                raise ValueError("expert_scales needs one list per stage with one scale per expert")
        if self.routing_loss == "budget" and not (self.budget_target is not None and 0 < self.budget_target <= 1):
            raise ValueError(
                f"routing_loss='budget' needs budget_target, a FLOPs fraction in (0, 1]; got {self.budget_target}"
            )
        self._check_strategy()
        if self.version > CONFIG_VERSION:
            raise ValueError(
                f"pyramid config version {self.version} is newer than this dpn supports ({CONFIG_VERSION}); "
                "upgrade dpn"
            )

    @property
    def selects_tokens(self) -> bool:
        """True for strategies that keep a subset of tokens (fastv, pdrop) rather than pool a grid."""
        return self.strategy in SELECTION_STRATEGIES

    def _check_strategy(self) -> None:
        name = self.strategy
        selecting = [s.keep_ratio is not None for s in self.stages]
        if self.selects_tokens and not all(selecting):
            raise ValueError(f"every stage of a {name} config needs a keep_ratio (and no experts)")
        if not self.selects_tokens and any(selecting):
            raise ValueError(f"the {name} strategy pools with experts; keep_ratio is for fastv and pdrop")
        if name == "fastv" and len(self.stages) != 1:
            raise ValueError(f"fastv prunes once: give one stage, got {len(self.stages)} (use pdrop for several)")
        if name in ("static", "projector") and any(len(s.experts) != 1 for s in self.stages):
            raise ValueError(f"each stage of a {name} config has exactly one expert (its fixed stride)")
        before_first = [s.layer == BEFORE_FIRST_LAYER for s in self.stages]
        if name == "projector" and (len(self.stages) != 1 or not before_first[0]):
            raise ValueError(f"projector compression is one stage at layer {BEFORE_FIRST_LAYER} (before the LLM)")
        if name != "projector" and any(before_first):
            raise ValueError(f"only the projector strategy compresses before the first layer (layer {BEFORE_FIRST_LAYER})")
        if name != "dpn" and self.routing_loss != "none":
            raise ValueError(f"the {name} strategy has no router: set routing_loss='none'")

    # ----------------------------------------------------------------------------------- presets
    @classmethod
    def paper_default(cls, model_config: Any, **overrides: Any) -> PyramidConfig:
        """The paper's schedule scaled to the model's depth and checked against its visual grid.

        Stages sit after 1/4, 1/2 and 3/4 of the decoder layers (layers 8, 16, 24 of a 32-layer LLM)
        with experts keep / 1x2 / 2x2. An expert that would not divide the visual grid on some
        routing path is dropped from that stage (and a stage left with only 1x1 is dropped), so the
        preset is valid for any grid.
        """
        from dpn.models import get_adapter

        adapter = get_adapter(model_config)
        num_layers = adapter.num_layers(model_config)
        grid = adapter.visual_grid(model_config)
        layers = paper_stage_layers(num_layers)
        min_tokens = overrides.get("min_tokens_to_pool", PAPER_MIN_TOKENS)
        stages: list[PyramidStage] = []
        for layer in layers:
            reachable = reachable_grids(grid, stages, min_tokens)
            experts = [e for e in PAPER_EXPERTS if all(_divides(g, e, min_tokens) for g in reachable)]
            if experts != [(1, 1)]:  # a stage that can only keep everything would do nothing
                stages.append(PyramidStage(layer=layer, experts=experts))
        return cls(stages=stages, **overrides)

    @classmethod
    def static(cls, model_config: Any, expert: tuple[int, int], **overrides: Any) -> PyramidConfig:
        """The paper's stages with one fixed stride (the paper's "static" ablation).

        A stage where ``expert`` would not divide the grid left by earlier stages is dropped.
        """
        paper = cls.paper_default(model_config, **overrides)
        from dpn.models import get_adapter

        grid = get_adapter(model_config).visual_grid(model_config)
        stages: list[PyramidStage] = []
        for stage in paper.stages:
            grids = reachable_grids(grid, stages, paper.min_tokens_to_pool)
            if all(_divides(g, expert, paper.min_tokens_to_pool) for g in grids):
                stages.append(PyramidStage(layer=stage.layer, experts=[expert]))
        if not stages:
            raise ValueError(f"the static stride {expert} divides none of the model's pyramid stages")
        overrides.setdefault("routing_loss", "none")  # one expert: nothing to route
        overrides.setdefault("strategy", "static")
        return cls(stages=stages, **overrides)

    @classmethod
    def random_experts(cls, model_config: Any, **overrides: Any) -> PyramidConfig:
        """The paper's stages and experts, each sample's expert drawn uniformly (an ablation)."""
        overrides.update(strategy="random", routing_loss="none")
        return cls.paper_default(model_config, **overrides)

    @classmethod
    def projector(cls, model_config: Any, expert: tuple[int, int], **overrides: Any) -> PyramidConfig:
        """Pool the visual grid with one fixed stride before the first decoder layer."""
        overrides.update(strategy="projector", routing_loss="none")
        config = cls(stages=[PyramidStage(BEFORE_FIRST_LAYER, [expert])], **overrides)
        from dpn.models import get_adapter

        adapter = get_adapter(model_config)
        config.validate_for(adapter.num_layers(model_config), adapter.visual_grid(model_config))
        return config

    @classmethod
    def fastv(
        cls, model_config: Any, keep_ratio: float = FASTV_KEEP_RATIO, layer: int = FASTV_LAYER, **overrides: Any
    ) -> PyramidConfig:
        """FastV: layers before ``layer`` see every token; from ``layer`` on, ``keep_ratio`` of them."""
        from dpn.models import get_adapter

        num_layers = get_adapter(model_config).num_layers(model_config)
        if not 1 <= layer < num_layers:
            raise ValueError(f"fastv's layer K must be in 1..{num_layers - 1} for a {num_layers}-layer model, got {layer}")
        overrides.update(strategy="fastv", routing_loss="none")
        return cls(stages=[PyramidStage(layer - 1, keep_ratio=keep_ratio)], **overrides)

    @classmethod
    def pdrop(cls, model_config: Any, keep_ratio: float = PDROP_KEEP_RATIO, **overrides: Any) -> PyramidConfig:
        """PyramidDrop at DPN's stage depths: each stage keeps ``keep_ratio`` of the remaining tokens."""
        from dpn.models import get_adapter

        num_layers = get_adapter(model_config).num_layers(model_config)
        layers = paper_stage_layers(num_layers)
        overrides.update(strategy="pdrop", routing_loss="none")
        return cls(stages=[PyramidStage(layer, keep_ratio=keep_ratio) for layer in layers], **overrides)

    @classmethod
    def from_spec(cls, spec: str, model_config: Any) -> PyramidConfig | None:
        """A config from a short string (see ``SPEC_HELP``) or a path to a pyramid_config.json."""
        name, _, argument = spec.partition(":")
        if spec == "none":
            return None
        if spec in ("paper", "dpn"):
            return cls.paper_default(model_config)
        if spec == "random":
            return cls.random_experts(model_config)
        if name in ("static", "projector") and argument:
            stride = _parse_stride(spec, argument)
            return cls.static(model_config, stride) if name == "static" else cls.projector(model_config, stride)
        if name in ("fastv", "pdrop"):
            ratio = _parse_ratio(spec, argument) if argument else None
            kwargs = {} if ratio is None else {"keep_ratio": ratio}
            return cls.fastv(model_config, **kwargs) if name == "fastv" else cls.pdrop(model_config, **kwargs)
        if name == "budget" and argument:
            return cls.paper_default(model_config, routing_loss="budget", budget_target=_parse_ratio(spec, argument))
        path = Path(spec)
        if path.exists():
            return cls.load(path)
        raise ValueError(f"pyramid spec {spec!r} is not one of: {SPEC_HELP}")

    # ------------------------------------------------------------------------------- validation
    def validate_for(self, num_layers: int, grid: tuple[int, int]) -> None:
        """Raise ``ValueError`` if this pyramid cannot run on a model of this depth and visual grid."""
        lowest = BEFORE_FIRST_LAYER if self.strategy == "projector" else 0
        for stage in self.stages:
            if not lowest <= stage.layer < num_layers - 1:
                raise ValueError(
                    f"stage layer {stage.layer} is out of range: the model has {num_layers} decoder layers, so a "
                    f"stage must compress after a layer in {lowest}..{num_layers - 2}"
                )
        if self.selects_tokens:
            return
        stages_so_far: list[PyramidStage] = []
        for stage in self.stages:
            for g in reachable_grids(grid, stages_so_far, self.min_tokens_to_pool):
                for expert in stage.experts:
                    if not _divides(g, expert, self.min_tokens_to_pool):
                        raise ValueError(
                            f"expert {expert} of the stage after layer {stage.layer} does not divide the {g[0]}x{g[1]} "
                            f"visual grid that earlier stages can produce from the model's {grid[0]}x{grid[1]} grid; "
                            "choose strides that divide every reachable grid"
                        )
            stages_so_far.append(stage)

    def scales(self, stage_index: int) -> list[float]:
        if self.expert_scales is not None:
            return list(self.expert_scales[stage_index])
        return [float(i) for i in range(len(self.stages[stage_index].experts))]

    # ------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = [
            {"layer": s.layer, "keep_ratio": s.keep_ratio} if s.experts is None
            else {"layer": s.layer, "experts": [list(e) for e in s.experts]}
            for s in self.stages
        ]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PyramidConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown pyramid config keys {unknown}; known keys are {sorted(known)}")
        if "stages" not in data:
            raise ValueError("pyramid config has no 'stages'")
        data = dict(data)
        stages = []
        for stage in data["stages"]:
            unknown_stage = sorted(set(stage) - {"layer", "experts", "keep_ratio"})
            if "layer" not in stage or unknown_stage:
                raise ValueError(f"a stage is {{layer, experts}} or {{layer, keep_ratio}}; got keys {sorted(stage)}")
            experts = stage.get("experts")
            stages.append(PyramidStage(
                layer=stage["layer"], experts=None if experts is None else [tuple(e) for e in experts],
                keep_ratio=stage.get("keep_ratio"),
            ))
        data["stages"] = stages
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write the config as JSON. ``path`` may be a directory (then ``pyramid_config.json`` in it)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PyramidConfig:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no pyramid config at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); is the file truncated?") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(data)


SPEC_HELP = (
    "none | paper (= dpn) | budget:F (DPN trained toward F x vanilla FLOPs) | random | static:KHxKW | "
    "projector:KHxKW | fastv[:KEEP] | pdrop[:KEEP] | a path to a pyramid_config.json"
)


def _parse_stride(spec: str, argument: str) -> tuple[int, int]:
    try:
        kh, kw = (int(k) for k in argument.lower().split("x"))
    except ValueError as err:
        raise ValueError(f"pyramid spec {spec!r}: the stride must look like 2x2") from err
    return kh, kw


def _parse_ratio(spec: str, argument: str) -> float:
    try:
        ratio = float(argument)
    except ValueError as err:
        raise ValueError(f"pyramid spec {spec!r}: {argument!r} is not a number") from err
    if not 0 < ratio <= 1:
        raise ValueError(f"pyramid spec {spec!r}: the fraction must be in (0, 1]")
    return ratio


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _divides(grid: tuple[int, int], expert: tuple[int, int], min_tokens: int) -> bool:
    if grid[0] * grid[1] < min_tokens:
        return True  # too small to pool: left as it is
    return grid[0] % expert[0] == 0 and grid[1] % expert[1] == 0


def pooled_grid(grid: tuple[int, int], expert: tuple[int, int], min_tokens: int) -> tuple[int, int]:
    """Grid after pooling with ``expert``; grids below ``min_tokens`` are not pooled."""
    if grid[0] * grid[1] < min_tokens:
        return grid
    return grid[0] // expert[0], grid[1] // expert[1]


def reachable_grids(
    grid: tuple[int, int], stages: list[PyramidStage], min_tokens: int
) -> set[tuple[int, int]]:
    """Every grid an image can have after ``stages``, over all routing paths (paths that divide)."""
    grids = {grid}
    for stage in stages:
        grids = {
            pooled_grid(g, e, min_tokens) for g, e in product(grids, stage.experts) if _divides(g, e, min_tokens)
        }
    return grids


def visual_tokens_after(grid: tuple[int, int], path: list[tuple[int, int]], min_tokens: int) -> list[int]:
    """Visual tokens of one image before the first stage and after each stage of ``path``."""
    counts = [grid[0] * grid[1]]
    for expert in path:
        grid = pooled_grid(grid, expert, min_tokens)
        counts.append(grid[0] * grid[1])
    return counts


def paper_stage_layers(num_layers: int) -> list[int]:
    """The paper's stage layers (1/4, 1/2, 3/4 of depth) that leave at least one layer after them."""
    layers = [layer for layer in stage_fraction_layers(num_layers, PAPER_STAGE_FRACTIONS) if layer < num_layers - 1]
    if not layers:
        raise ValueError(f"a {num_layers}-layer model is too shallow for a pyramid")
    return layers


def stage_fraction_layers(num_layers: int, fractions: tuple[float, ...]) -> list[int]:
    """0-indexed layers after which to pool, at the given fractions of depth."""
    return sorted({max(0, math.floor(num_layers * f + 0.5) - 1) for f in fractions})


__all__ = ["PyramidConfig", "PyramidStage", "CONFIG_NAME"]
