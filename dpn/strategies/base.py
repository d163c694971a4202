"""The interface between the runtime and a compression strategy.

A strategy looks at the hidden states after a stage's layer and says, for some images, which new
tokens replace them. The runtime does the rest: it rebuilds the shorter sequences, their masks,
positions, labels and cache bookkeeping. A strategy never touches the layout itself.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dpn.config import PyramidConfig
from dpn.spans import VisualSpans


@dataclass
class StagePlan:
    """New tokens for some images, in the order of ``spans``.

    Attributes:
        spans: indices (into the current ``VisualSpans``) of the images being replaced.
        rows: the replacement tokens of all those images, concatenated, shape (P, d).
        representatives: for each replacement token, the flat index (sample * seq_len + position) of
            the original token it stands for; its position (``keep`` mode) and label come from there.
        grids: the (rows, cols) grid of each replaced image after this stage (selected tokens form
            a single row).
        experts: (batch,) chosen expert per sample, -1 where the sample was not routed.
        expert_probability: (batch,) probability of the chosen expert (0 where not routed).
        router_probs: (batch, num_experts) router probabilities (zeros where not routed).
        routed: (batch,) bool, samples the router decided for.
    """

    spans: list[int] = field(default_factory=list)
    rows: torch.Tensor | None = None
    representatives: torch.Tensor | None = None
    grids: list[tuple[int, int]] = field(default_factory=list)
    experts: torch.Tensor | None = None
    expert_probability: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None
    routed: torch.Tensor | None = None

    @classmethod
    def unrouted(cls, batch: int, num_experts: int, device: torch.device) -> StagePlan:
        """A plan that replaces nothing yet, with every sample marked as not routed."""
        return cls(
            experts=torch.full((batch,), -1, dtype=torch.long, device=device),
            expert_probability=torch.zeros(batch, device=device),
            router_probs=torch.zeros(batch, num_experts, device=device),
            routed=torch.zeros(batch, dtype=torch.bool, device=device),
        )


@dataclass
class StageInput:
    """What the runtime knows at a stage, in the current (possibly already shortened) layout.

    Attributes:
        hidden: (batch, length, d) output of the stage's layer.
        spans: where each image's visual tokens sit.
        query_index: (batch,) the last prompt token of each sample (-1 for none): the router's
            input, and the query whose attention ranks tokens for fastv / pdrop.
        valid: (batch, length) real tokens.
        forced: (batch,) expert per sample forced by the caller (-1: the strategy decides), or None.
        layer: the stage's decoder layer (None before the first layer).
        layer_input: (batch, length) input of that layer (None before the first layer).
        position_embeddings: the rotary (cos, sin) that layer ran with.
    """

    hidden: torch.Tensor
    spans: VisualSpans
    query_index: torch.Tensor
    valid: torch.Tensor
    forced: torch.Tensor | None = None
    layer: nn.Module | None = None
    layer_input: torch.Tensor | None = None
    position_embeddings: Any = None


class Strategy(nn.Module, metaclass=ABCMeta):
    """A compression strategy: plans each stage; may own trainable weights and an auxiliary loss.

    Subclasses hold no per-call state: everything about a call lives in ``StageInput`` and the
    returned ``StagePlan``. ``reads_query``: whether plans read each sample's ``query_index`` (then
    a sample with an image must have one).
    """

    reads_query = False

    def __init__(self, config: PyramidConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def stage_layers(self) -> list[int]:
        return [stage.layer for stage in self.config.stages]

    def num_choices(self, stage: int) -> int:
        """How many experts ``force_experts`` may pick from at ``stage`` (0: forcing does not apply)."""
        experts = self.config.stages[stage].experts
        return len(experts) if experts is not None else 0

    @abstractmethod
    def plan(self, stage: int, inputs: StageInput) -> StagePlan:
        """New tokens for the images of this stage (see ``StagePlan``)."""

    def routing_loss(self, plans: list[StagePlan], budget: Any = None) -> torch.Tensor | None:
        """An auxiliary loss over the plans of one forward (None when the strategy has none)."""
        return None
