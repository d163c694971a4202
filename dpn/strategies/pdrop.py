"""PyramidDrop (arXiv 2410.17247): at several depths (DPN's, 1/4, 1/2, 3/4), each stage keeps a
ratio λ (0.5 by default) of the visual tokens left.

The ranking is the reference's (Cooperx521/PyramidDrop, ``modeling_llama_pdrop.py``): after stage
layer i, the tokens are scored with **layer i+1's** input norm and query/key projections applied to
**layer i's output** (the input layer i+1 is about to see), i.e. by the attention layer i+1 would
pay them. The query is the last instruction token; when the answers are in the sequence (training,
or any call with labels), the attention rows of the token before every answer of every turn are
averaged. Positions are renumbered after each stage, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dpn.attention import query_attention
from dpn.geometry import ModelGeometry
from dpn.supervision import supervised_tokens
from dpn.strategies.base import StageInput, check_choice, fraction_spec, register_spec, register_strategy
from dpn.strategies.schedule import paper_stage_layers
from dpn.strategies.selection import AttentionSelection, SelectionConfig, SelectionStage

PDROP_KEEP_RATIO = 0.5


PDROP_RANKINGS = ("next_layer", "same_layer")


@dataclass
class PDropConfig(SelectionConfig):
    """``ranking``: ``"next_layer"`` (the reference's rule, see the module docstring) or
    ``"same_layer"`` (the stage layer's own attention on its input, with the last prompt token: what
    dpn did before config version 3; kept so that pyramids saved then give the same outputs)."""

    name = "pdrop"
    ranking: str = "next_layer"

    def __post_init__(self) -> None:
        check_choice("ranking", self.ranking, PDROP_RANKINGS)

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Version 2 -> 3: PyramidDrop now ranks with the next layer, as its reference does; a
        version-2 config was saved (and possibly trained) ranking with the stage's own layer, which
        it keeps."""
        if version < 3 and "ranking" not in data:
            return {**data, "ranking": "same_layer"}
        return data


def pre_answer_queries(labels: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, Q) positions of the token before each answer span (every turn), and which are real.
    A sample without any answer has none (``valid`` all false for it)."""
    supervised = supervised_tokens(labels, valid)
    starts = supervised.clone()
    starts[:, 1:] &= ~supervised[:, :-1]  # the first token of each answer span
    before = torch.zeros_like(starts)
    before[:, :-1] = starts[:, 1:]
    counts = before.sum(1)
    width = max(1, int(counts.max()))
    # Stable sort: each sample's query positions first, in order, then padding.
    order = torch.argsort((~before).int(), dim=1, stable=True)[:, :width]
    real = torch.arange(width, device=labels.device)[None, :] < counts[:, None]
    return order, real


class NextLayerSelection(AttentionSelection):
    """PyramidDrop's ranking: the next layer's attention on this layer's output."""

    def scores(self, stage: int, inputs: StageInput) -> torch.Tensor:
        if self.strategy_config.ranking == "same_layer":
            return super().scores(stage, inputs)
        following = inputs.decoder.layers[self.config.stages[stage].layer + 1]
        last = inputs.query_index.clamp(min=0)
        if inputs.labels is None:
            return query_attention(following, inputs.hidden, inputs.position_embeddings, last, inputs.valid)
        positions, real = pre_answer_queries(inputs.labels, inputs.valid)
        # A sample without an answer falls back to its last prompt token.
        positions = torch.where(real.any(1, keepdim=True), positions, last[:, None])
        real = real | ~real.any(1, keepdim=True)
        return query_attention(following, inputs.hidden, inputs.position_embeddings, positions, inputs.valid, real)


def preset(geometry: ModelGeometry, keep_ratio: float = PDROP_KEEP_RATIO, **options) -> dict:
    stages = [SelectionStage(layer, keep_ratio=keep_ratio) for layer in paper_stage_layers(geometry.num_layers)]
    return {"stages": stages, "strategy": PDropConfig(**options)}


register_strategy("pdrop", PDropConfig, NextLayerSelection)
register_spec("pdrop", fraction_spec("pdrop", preset), "pdrop[:KEEP]", plot_style="C4D-")
