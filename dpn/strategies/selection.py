"""Attention-ranked token selection: the part shared by FastV (arXiv 2403.06764) and PyramidDrop
(arXiv 2410.17247).

At a stage, each grid keeps ``keep_ratio`` of its remaining visual tokens: those that receive the
most attention from the sample's query token(s), averaged over heads (which layer and which
queries: each strategy's ``scores``). Kept tokens stay in their original order; they no longer form a 2D grid, so
a grid becomes a single row of tokens. Nothing here is trained (the model may be fine-tuned with
the selection in place).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dpn.attention import query_attention
from dpn.geometry import ModelGeometry
from dpn.strategies.base import (
    BEFORE_FIRST_LAYER, SpecBuilder, Stage, StageInput, StagePlan, Strategy, StrategyConfig, TokenPath, check_fraction,
    fraction_spec,
)


def kept_count(tokens: int, keep_ratio: float) -> int:
    """Tokens a grid of ``tokens`` keeps at ``keep_ratio`` (at least one)."""
    return max(1, round(tokens * keep_ratio))


@dataclass
class SelectionStage(Stage):
    """After decoder layer ``layer``, keep ``keep_ratio`` of each grid's remaining visual tokens."""

    keep_ratio: float = None  # type: ignore[assignment]  # required; checked below

    def __post_init__(self) -> None:
        super().__post_init__()
        self.keep_ratio = check_fraction("keep_ratio", self.keep_ratio)

    @classmethod
    def from_dict(cls, data):
        if isinstance(data, dict) and "experts" in data:
            raise ValueError(f"a token-selection stage needs a keep_ratio (and no experts): "
                             f"{{layer, keep_ratio}}; got keys {sorted(data)}")
        return super().from_dict(data)


@dataclass
class SelectionConfig(StrategyConfig):
    stage_class = SelectionStage

    def token_paths(self, stages: list[SelectionStage], grids) -> list[TokenPath]:
        shapes = [list(grids)]
        for stage in stages:  # kept tokens form one row
            shapes.append([(1, kept_count(rows * cols, stage.keep_ratio)) for rows, cols in shapes[-1]])
        return [TokenPath([f"keep {s.keep_ratio:g}" for s in stages], shapes)]


@dataclass
class BeforeLLMSelectionConfig(SelectionConfig):
    """A selection made once, before the first decoder layer (one stage at layer -1)."""

    def allows_layer_before_first(self) -> bool:
        return True

    def check_stages(self, stages: list[SelectionStage]) -> None:
        super().check_stages(stages)
        if len(stages) != 1 or stages[0].layer != BEFORE_FIRST_LAYER:
            raise ValueError(f"{self.name} prunes once, before the LLM: one stage at layer {BEFORE_FIRST_LAYER}")


# Spec suffix of a budget given as visual tokens kept per image (``divprune:64t``), the papers' terms.
TOKENS_SUFFIX = "t"


def kept_tokens_spec(name: str, preset: Callable[..., dict]) -> SpecBuilder:
    """The builder of spec ``name[:KEEP | :Nt]`` for a selection before the LLM: ``preset(geometry)``,
    with ``keep_ratio=KEEP`` (a fraction), or keeping N visual tokens of each image (models whose
    images all have the same number of tokens)."""
    def build(geometry: ModelGeometry, value: str | None) -> dict:
        if not value or not value.endswith(TOKENS_SUFFIX):
            return fraction_spec(name, preset)(geometry, value)
        spec, count = f"{name}:{value}", value[: -len(TOKENS_SUFFIX)]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"pyramid spec {spec!r}: give a whole number of tokens, e.g. '{name}:64t'")
        if geometry.image_grids is None:
            raise ValueError(f"pyramid spec {spec!r}: {geometry.model_type} images vary in size, so a token count "
                             f"is not one share of every image; give a fraction, e.g. '{name}:0.25'")
        if int(count) > geometry.image_tokens:
            raise ValueError(f"pyramid spec {spec!r}: an image has only {geometry.image_tokens} visual tokens")
        return preset(geometry, keep_ratio=int(count) / geometry.image_tokens)
    return build


class ImageByImage(Strategy):
    """A strategy that replaces each image's tokens on their own, one visual span at a time:
    ``stage_context`` computes once per stage what every image reads (cues, scores), and
    ``image_tokens`` says what one image becomes."""

    def plan(self, stage: int, inputs: StageInput) -> StagePlan:
        hidden, spans = inputs.hidden, inputs.spans
        batch, seq_len, _ = hidden.shape
        plan = StagePlan.unrouted(batch, 0, hidden.device)
        if not len(spans):
            return plan
        context = self.stage_context(stage, inputs)
        rows, representatives = [], []
        for k in range(len(spans)):
            image = spans.token_index([k], seq_len, hidden.device)
            image_rows, stand_for = self.image_tokens(stage, inputs, context, k, image)
            rows.append(image_rows)
            representatives.append(stand_for)
            plan.spans.append(k)
            plan.grids.append((1, image_rows.shape[0]))
        plan.rows = torch.cat(rows).to(hidden.dtype)
        plan.representatives = torch.cat(representatives)
        return plan

    def stage_context(self, stage: int, inputs: StageInput) -> Any:
        """What every image of this stage reads (computed once; None by default)."""
        return None

    @abstractmethod
    def image_tokens(self, stage: int, inputs: StageInput, context: Any, k: int,
                     image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, representatives): the tokens image ``k`` becomes and, for each, the flat index of
        the original token it stands for; ``image`` is the flat index of the image's visual tokens."""


def query_attention_scores(name: str, inputs: StageInput) -> torch.Tensor:
    """(batch, length) the attention each sample's query token pays each token inside the stage's
    own layer (mean over heads), as FastV ranks; ``name`` is the strategy asking, for the error."""
    if inputs.layer is None or inputs.layer_input is None:
        raise ValueError(f"{name} ranks tokens with a decoder layer's attention; "
                         "its stages must sit after a layer (layer >= 0)")
    return query_attention(inputs.layer, inputs.layer_input, inputs.position_embeddings,
                           inputs.query_index.clamp(min=0), inputs.valid)


class AttentionSelection(Strategy):
    """Keeps each grid's most-attended tokens. The ranking (``scores``), as FastV ranks: the
    attention the sample's last prompt token pays each token inside the stage's own layer."""

    reads_query = True

    def scores(self, stage: int, inputs: StageInput) -> torch.Tensor:
        """(batch, length) the attention each token receives, by this strategy's rule."""
        return query_attention_scores(self.strategy_config.name, inputs)

    def plan(self, stage: int, inputs: StageInput) -> StagePlan:
        hidden, spans = inputs.hidden, inputs.spans
        plan = StagePlan.unrouted(hidden.shape[0], 0, hidden.device)
        if not len(spans):  # the runtime has checked that each image has a query token
            return plan
        scores = self.scores(stage, inputs).flatten()
        keep_ratio = self.config.stages[stage].keep_ratio
        groups: dict[int, list[int]] = {}
        for k in range(len(spans)):
            groups.setdefault(spans.size(k), []).append(k)
        return select_top_scored(plan, hidden, spans, scores,
                                 {(size, kept_count(size, keep_ratio)): members for size, members in groups.items()})


def select_top_scored(plan: StagePlan, hidden: torch.Tensor, spans, scores: torch.Tensor,
                      groups: dict[tuple[int, int], list[int]]) -> StagePlan:
    """Add to ``plan`` the ``keep`` best-scored tokens of each grid of ``groups`` ((size, keep) ->
    span indices), in their original order; ``scores`` is flat (batch * length)."""
    batch, seq_len, width = hidden.shape
    flat = hidden.reshape(batch * seq_len, width)
    for (size, keep), members in groups.items():
        index = spans.token_index(members, seq_len, hidden.device).view(len(members), size)
        top = scores[index].topk(keep, dim=1).indices.sort(dim=1).values
        chosen = index.gather(1, top).flatten()
        plan.extend(members, (1, keep), flat[chosen], chosen, index.flatten())
    return plan
