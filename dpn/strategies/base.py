"""What every compression strategy is made of, and the registry that names them.

A strategy is three things, registered together with :func:`register_strategy`:

- a **stage** type (:class:`Stage` subclass): what one compression point says besides its layer
  (pooling strides, a keep ratio, ...);
- a **config** (:class:`StrategyConfig` subclass): the strategy's own hyper-parameters, their
  validation (alone, against the stages, against a model's geometry) and the visual tokens each
  routing path keeps (what ``dpn flops`` and budget losses count);
- a **module** (:class:`Strategy` subclass): at each stage it looks at the hidden states and says,
  for some images, which new tokens replace them (``plan``); it may own weights and an auxiliary
  loss. The runtime rebuilds the shorter sequences, masks, positions, labels and cache; a
  strategy never touches the layout, and the runtime never names a strategy.

Spec strings (``--pyramid fastv:0.5``) map to presets with :func:`register_spec`.
"""

from __future__ import annotations

import math
import warnings
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from dpn.geometry import ModelGeometry
from dpn.spans import VisualSpans
from dpn.vision_cues import VisionCues

if TYPE_CHECKING:
    from dpn.config import PyramidConfig

# A stage at this layer compresses before the first decoder layer (projector-side pooling).
BEFORE_FIRST_LAYER = -1


# ------------------------------------------------------------------------------------ configs
@dataclass
class Stage:
    """One compression point, after decoder layer ``layer`` (0-indexed; -1: before the first layer)."""

    layer: int

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"stage layer must be an int, got {self.layer!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or "layer" not in data or set(data) - names:
            raise ValueError(f"a stage of this strategy has the keys {sorted(names)}; got {data!r}")
        return cls(**data)


@dataclass(frozen=True)
class TokenPath:
    """One way a single image can go through the stages: a label per stage and, before the first
    stage and after each, the shape (rows, cols) of each of the image's grids."""

    labels: list[str]
    shapes: list[list[tuple[int, int]]]

    @property
    def visual_tokens(self) -> list[int]:
        return [sum(rows * cols for rows, cols in grids) for grids in self.shapes]

    def rows(self) -> list[list[int]]:
        """Rows of each grid per segment (what a grid with row newlines keeps one newline for)."""
        return [[rows for rows, _ in grids] for grids in self.shapes]


@dataclass
class StrategyConfig(metaclass=ABCMeta):
    """Hyper-parameters of one strategy (subclasses add fields; ``name`` and ``stage_class`` are
    class attributes). Validates its own fields in ``__post_init__``."""

    name: ClassVar[str]
    stage_class: ClassVar[type[Stage]] = Stage

    def check_stages(self, stages: list[Stage]) -> None:
        """Raise ``ValueError`` if ``stages`` do not fit this strategy (type, count, layers)."""
        wrong = [type(s).__name__ for s in stages if type(s) is not self.stage_class]
        if wrong:
            raise ValueError(f"the stages of a {self.name} pyramid are {self.stage_class.__name__}s, got {wrong}")
        if any(s.layer == BEFORE_FIRST_LAYER for s in stages) and not self.allows_layer_before_first():
            raise ValueError(f"only the projector strategy compresses before the first layer (layer {BEFORE_FIRST_LAYER})")

    def allows_layer_before_first(self) -> bool:
        return False

    def check_geometry(self, stages: list[Stage], geometry: ModelGeometry) -> None:
        """Raise ``ValueError`` if the pyramid cannot run on a model of this geometry."""
        lowest = BEFORE_FIRST_LAYER if self.allows_layer_before_first() else 0
        for stage in stages:
            if not lowest <= stage.layer < geometry.num_layers - 1:
                raise ValueError(
                    f"stage layer {stage.layer} is out of range: the model has {geometry.num_layers} decoder layers, "
                    f"so a stage must compress after a layer in {lowest}..{geometry.num_layers - 2}"
                )

    @abstractmethod
    def token_paths(self, stages: list[Stage], grids: tuple[tuple[int, int], ...]) -> list[TokenPath]:
        """Every routing path of one image with these ``grids`` and the visual tokens it keeps."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}}

    # Saved configs of older file versions (``dpn.config`` reads the shared part; each strategy
    # migrates its own part, so the config module names no strategy).
    #: the keys a version-1 file (one flat object for every strategy) may hold for this strategy.
    version_1_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_version_1(cls, flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """This strategy's part of a version-1 file's flat object (without ``name``), and the
        inference-time settings the file kept in it (which now live on the strategy module)."""
        return {k: flat[k] for k in cls.version_1_keys if k in flat}, {}

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """This strategy's part of a config written by file format ``version`` (2 or later), in the
        current format; a strategy whose meaning changed between versions overrides it."""
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StrategyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"name"})
        if unknown:
            raise ValueError(f"unknown {cls.name} strategy keys {unknown}; known keys are {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k != "name"})


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_int(name: str, value: Any, minimum: int) -> None:
    """``value`` is an int (not a bool) of at least ``minimum``, or a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float in (0, 1], or a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return float(value)


def check_finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


# ------------------------------------------------------------------------------------ modules
@dataclass
class StagePlan:
    """New tokens for some images, in the order of ``spans``.

    Attributes:
        spans: indices (into the current ``VisualSpans``) of the grids being replaced.
        rows: the replacement tokens of all those grids, concatenated, shape (P, d).
        representatives: for each replacement token, the flat index (sample * seq_len + position) of
            the original token it stands for; its position (``keep`` mode) and label come from there.
        grids: the (rows, cols) grid of each replaced grid after this stage (selected tokens form
            a single row).
        experts: (batch,) chosen expert per sample, -1 where the sample was not routed.
        expert_probability: (batch,) probability of the chosen expert (0 where not routed).
        router_probs: (batch, num_experts) router probabilities (zeros where not routed).
        routed: (batch,) bool, samples the router decided for.
        token_index: the flat index of the replaced grids' visual tokens in the order of ``spans``,
            where the strategy already computed it (else ``shrink`` does, when it needs it).
    """

    spans: list[int] = field(default_factory=list)
    rows: torch.Tensor | None = None
    representatives: torch.Tensor | None = None
    grids: list[tuple[int, int]] = field(default_factory=list)
    experts: torch.Tensor | None = None
    expert_probability: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None
    routed: torch.Tensor | None = None
    token_index: torch.Tensor | None = None

    @classmethod
    def unrouted(cls, batch: int, num_experts: int, device: torch.device) -> StagePlan:
        """A plan that replaces nothing yet, with every sample marked as not routed."""
        return cls(
            experts=torch.full((batch,), -1, dtype=torch.long, device=device),
            expert_probability=torch.zeros(batch, device=device),
            router_probs=torch.zeros(batch, num_experts, device=device),
            routed=torch.zeros(batch, dtype=torch.bool, device=device),
        )

    def extend(self, members: list[int], grid: tuple[int, int], rows: torch.Tensor, representatives: torch.Tensor,
               token_index: torch.Tensor) -> None:
        """Replace the grids ``members`` (span indices; each becomes ``grid``) by ``rows`` (their new
        tokens, concatenated), with each new token's ``representatives`` and the ``token_index`` of
        the tokens they replace. One plan may hold grids replaced in different ways."""
        self.spans.extend(members)
        self.grids.extend([grid] * len(members))
        self.rows = rows if self.rows is None else torch.cat([self.rows, rows])
        self.representatives = (representatives if self.representatives is None
                                else torch.cat([self.representatives, representatives]))
        self.token_index = token_index if self.token_index is None else torch.cat([self.token_index, token_index])


@dataclass
class InputLayout:
    """The first decoder layer's input, before any stage: its hidden states (the embeddings with the
    visual features merged in), visual spans and query tokens (SparseVLM picks its text raters there)."""

    hidden: torch.Tensor
    spans: VisualSpans
    query_index: torch.Tensor


@dataclass
class StageInput:
    """What the runtime knows at a stage, in the current (possibly already shortened) layout.

    Attributes:
        hidden: (batch, length, d) output of the stage's layer.
        spans: where each grid of visual tokens sits.
        query_index: (batch,) the last prompt token of each sample (-1 for none): the router's
            input, and the query whose attention ranks tokens for fastv / pdrop.
        valid: (batch, length) real tokens.
        forced: (batch,) expert per sample forced by the caller (-1: the strategy decides), or None.
        layer: the stage's decoder layer (None before the first layer).
        layer_input: (batch, length, d) input of that layer (None before the first layer).
        position_embeddings: the rotary (cos, sin) that layer ran with.
        decoder: the text decoder (its ``norm``, ``layers``, ``rotary_emb``), for strategies that
            need more of the model than the stage's layer.
        labels: (batch, length) the call's labels in the current layout (None without labels).
        router_tokens: (batch, length) bool, the router tokens whose mean hidden state the routers
            read (``router_input="router_tokens_mean"``); None: they read ``query_index``.
        vision_cues: the vision tower's cues, one per image (``dpn.vision_cues.VisionCues``), at a
            stage before the first layer of a strategy that ``reads_vision_cues``; else None.
        first_input: the call's input to the first decoder layer, before any stage (``InputLayout``).
    """

    hidden: torch.Tensor
    spans: VisualSpans
    query_index: torch.Tensor
    valid: torch.Tensor
    forced: torch.Tensor | None = None
    layer: nn.Module | None = None
    layer_input: torch.Tensor | None = None
    position_embeddings: Any = None
    decoder: nn.Module | None = None
    labels: torch.Tensor | None = None
    router_tokens: torch.Tensor | None = None
    vision_cues: VisionCues | None = None
    first_input: InputLayout | None = None

    def rows_at(self, index: torch.Tensor) -> torch.Tensor:
        """(n, d) the hidden states at flat indices (sample * length + position)."""
        return self.hidden.reshape(-1, self.hidden.shape[-1])[index]

    def router_hidden(self, samples: torch.Tensor) -> torch.Tensor:
        """(n, d) what the routers read for ``samples``: the hidden state at each one's query
        token, or the mean over its router tokens."""
        if self.router_tokens is None:
            return self.hidden[samples, self.query_index[samples]]
        weights = self.router_tokens[samples].to(self.hidden.dtype)
        weights = weights / weights.sum(1, keepdim=True).clamp(min=1)
        return torch.einsum("nl,nld->nd", weights, self.hidden[samples])


@dataclass
class TokenCounts:
    """Per-sample token counts of a prefill, before the first stage (for auxiliary losses)."""

    text: torch.Tensor  # (batch,)
    visual: torch.Tensor  # (batch,)


class Strategy(nn.Module, metaclass=ABCMeta):
    """A compression strategy's module: plans each stage; may own weights and an auxiliary loss.

    ``config`` is the whole (copied) ``PyramidConfig``; ``strategy_config`` its strategy part. Subclasses
    hold no per-call state: everything about a call lives in ``StageInput`` and the returned
    ``StagePlan``. ``reads_query``: whether plans read each sample's ``query_index`` (then a
    sample with an image must have one). ``reads_vision_cues``: whether plans read the vision
    tower's ``VisionCues`` (the family's geometry must have them).
    """

    reads_query: ClassVar[bool] = False
    reads_vision_cues: ClassVar[bool] = False

    def __init__(self, config: PyramidConfig, geometry: ModelGeometry) -> None:
        super().__init__()
        self.config = config
        self.strategy_config = config.strategy
        self.geometry = geometry

    @property
    def options(self) -> StrategyConfig:
        """The old name of ``strategy_config`` (before 0.3), kept for strategies written against it."""
        warnings.warn("Strategy.options is now Strategy.strategy_config", DeprecationWarning, stacklevel=2)
        return self.strategy_config

    @property
    def stage_layers(self) -> list[int]:
        return [stage.layer for stage in self.config.stages]

    def num_choices(self, stage: int) -> int:
        """How many experts ``force_experts`` may pick from at ``stage`` (0: forcing does not apply)."""
        return 0

    @abstractmethod
    def plan(self, stage: int, inputs: StageInput) -> StagePlan:
        """New tokens for the images of this stage (see ``StagePlan``)."""

    def auxiliary_loss(self, plans: list[StagePlan], counts: TokenCounts) -> torch.Tensor | None:
        """A loss over the plans of one forward, added to the LM loss in training (None: none)."""
        return None

    @property
    def auxiliary_loss_weight(self) -> float:
        return 0.0

    def total_loss(self, lm_loss: torch.Tensor, auxiliary: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
        """The training loss: ``lm_loss + weight * auxiliary * scale`` (``scale``: e.g. 1 / the
        gradient-accumulation steps when the auxiliary loss is a per-batch mean). The one place
        the auxiliary loss is weighted."""
        if auxiliary is None:
            return lm_loss
        return lm_loss + self.auxiliary_loss_weight * scale * auxiliary

    def inference_state(self) -> dict[str, str]:
        """Inference-time settings of this module (not its config) that ``save_pyramid`` keeps."""
        return {}

    def load_inference_state(self, state: dict[str, str]) -> None:
        """Restore what ``inference_state`` returned."""


# ----------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class StrategyEntry:
    name: str
    config_class: type[StrategyConfig]
    strategy_class: type[Strategy]


# A spec builder turns the argument after "name:" (or None) into a preset: the ``PyramidConfig``
# arguments (``stages``, ``strategy`` and any shared field) that ``dpn.presets.build`` completes.
SpecBuilder = Callable[[ModelGeometry, "str | None"], "dict[str, Any]"]


@dataclass(frozen=True)
class SpecEntry:
    """A spec string's builder, its usage line (``--pyramid`` help) and how the lab draws its curve
    (a matplotlib format string, e.g. ``"C2v-"``; None: the lab picks a spare one)."""

    name: str
    build: SpecBuilder
    usage: str
    plot_style: str | None = None


_STRATEGIES: dict[str, StrategyEntry] = {}
_SPECS: dict[str, SpecEntry] = {}


def register_strategy(name: str, config_class: type[StrategyConfig], strategy_class: type[Strategy]) -> None:
    """Make ``name`` a strategy: ``PyramidConfig(strategy=config_class(...))`` runs ``strategy_class``."""
    if getattr(config_class, "name", None) != name:
        raise ValueError(f"{config_class.__name__}.name must be {name!r} to register it under that name")
    _STRATEGIES[name] = StrategyEntry(name, config_class, strategy_class)


def register_spec(name: str, build: SpecBuilder, usage: str, plot_style: str | None = None) -> None:
    """Make ``name[:ARGUMENT]`` a spec string (``--pyramid``) built by ``build(geometry, argument)``."""
    _SPECS[name] = SpecEntry(name, build, usage, plot_style)


def strategy_entry(name: str) -> StrategyEntry:
    if name not in _STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; registered: {sorted(_STRATEGIES)}")
    return _STRATEGIES[name]


def registered_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def spec_entry(name: str) -> SpecEntry | None:
    return _SPECS.get(name)


def registered_specs() -> list[SpecEntry]:
    return list(_SPECS.values())


def parse_fraction_argument(spec: str, argument: str) -> float:
    """The number after ``name:`` in a spec, a fraction in (0, 1]."""
    try:
        value = float(argument)
    except ValueError as err:
        raise ValueError(f"pyramid spec {spec!r}: {argument!r} is not a number") from err
    if not 0 < value <= 1:
        raise ValueError(f"pyramid spec {spec!r}: the fraction must be in (0, 1]")
    return value


def fraction_spec(name: str, preset: Callable[..., dict], argument: str = "keep_ratio") -> SpecBuilder:
    """The builder of spec ``name[:F]``: ``preset(geometry)``, or with ``argument=F`` (a fraction)."""
    def build(geometry: ModelGeometry, value: str | None) -> dict:
        if not value:
            return preset(geometry)
        return preset(geometry, **{argument: parse_fraction_argument(f"{name}:{value}", value)})
    return build


def plain_spec(name: str, preset: Callable[..., dict]) -> SpecBuilder:
    """The builder of spec ``name``, which takes no argument."""
    def build(geometry: ModelGeometry, value: str | None) -> dict:
        if value:
            raise ValueError(f"pyramid spec '{name}:{value}' takes no argument; use '{name}'")
        return preset(geometry)
    return build
