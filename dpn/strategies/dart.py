"""DART: duplication-aware token reduction (Wen et al., "Stop Looking for Important Tokens in
Multimodal Language Models: Duplication Matters More", arXiv 2502.11494). Training-free.

After decoder layer K - 1 (K = 2 by default), each image keeps the visual tokens that are least
*duplicated*, not the most attended: a few **pivot** tokens are picked (the image tokens, and the
prompt tokens after the image, whose keys in layer K - 1 have the largest L1 norm), and each pivot
then claims, from the tokens not yet kept, an equal share of those least similar to it (cosine
similarity of hidden states after the decoder's final norm). Image pivots are kept. Kept tokens
keep their order and, by default, their original positions (as the reference does).

Two choices differ from the reference code (ZichenWen1/DART, batch size 1): the kept count is
exactly ``keep_ratio`` of the image (the reference keeps its image pivots on top of the budget and
drops the budget's remainder: 132 tokens for "128"), with the remainder spread over the first
pivots; pivots claim tokens in decreasing pivot score (the reference iterates a Python set).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpn.attention import layer_keys
from dpn.geometry import ModelGeometry
from dpn.spans import VisualSpans
from dpn.strategies.base import (
    StageInput, check_choice, fraction_spec, register_spec, register_strategy,
)
from dpn.strategies.selection import ImageByImage, SelectionConfig, SelectionStage, kept_count
from dpn.strategies.fastv import check_layer_k

# The reference's defaults for LLaVA-1.5: prune from layer K = 2 on, keep 128 of 576 visual tokens
# (a 77.8% reduction), 4 image pivots and 4 text pivots scored by the L1 norm of their keys.
DART_LAYER = 2
DART_KEEP_RATIO = 128 / 576
DART_IMAGE_PIVOTS = 4
DART_TEXT_PIVOTS = 4
PIVOT_NORMS = {"l1": 1, "l2": 2}


@dataclass
class DARTConfig(SelectionConfig):
    """Attributes:
        image_pivots: pivots taken among each image's visual tokens (kept, at least 1).
        text_pivots: pivots taken among the prompt tokens between the image and the query token.
        pivot_norm: ``"l1"`` (the reference) or ``"l2"`` norm of a token's keys, its pivot score.
    """

    name = "dart"
    image_pivots: int = DART_IMAGE_PIVOTS
    text_pivots: int = DART_TEXT_PIVOTS
    pivot_norm: str = "l1"

    def __post_init__(self) -> None:
        for field_name, lowest in (("image_pivots", 1), ("text_pivots", 0)):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"{field_name} must be an int >= {lowest}, got {value!r}")
        check_choice("pivot_norm", self.pivot_norm, tuple(PIVOT_NORMS))

    def check_stages(self, stages: list[SelectionStage]) -> None:
        super().check_stages(stages)
        if len(stages) != 1:
            raise ValueError(f"dart prunes once: give one stage, got {len(stages)}")


@dataclass
class DARTScores:
    """What every image of a DART stage reads: pivot scores and unit directions (batch, length[, d]),
    the tokens text pivots may come from, and each sample's query position."""

    pivot: torch.Tensor
    directions: torch.Tensor
    text: torch.Tensor
    queries: list[int]


class DuplicationAwareSelection(ImageByImage):
    """Keeps each image's least duplicated tokens (see the module docstring)."""

    reads_query = True
    options: DARTConfig

    def stage_context(self, stage: int, inputs: StageInput) -> DARTScores:
        if inputs.layer is None or inputs.layer_input is None or inputs.decoder is None:
            raise ValueError("dart scores pivots with a decoder layer's keys; its stage must sit after a layer (>= 0)")
        hidden, spans = inputs.hidden, inputs.spans
        batch, seq_len, _ = hidden.shape
        keys = layer_keys(inputs.layer, inputs.layer_input, inputs.position_embeddings)
        return DARTScores(
            pivot=keys.float().norm(p=PIVOT_NORMS[self.strategy_config.pivot_norm], dim=-1),  # (batch, length)
            # Cosine similarity after the final norm: its per-token scale cancels, its weights do not.
            directions=F.normalize(inputs.decoder.norm(hidden).float(), dim=-1),
            text=inputs.valid & ~_visual_mask(spans, batch, seq_len, hidden.device),
            queries=inputs.query_index.tolist(),  # one wait for the device, not one per image
        )

    def image_tokens(self, stage: int, inputs: StageInput, scores: DARTScores, k: int,
                     image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spans, seq_len = inputs.spans, inputs.hidden.shape[1]
        sample = spans.sample[k]
        positions = image - sample * seq_len  # positions in the sample
        text = _text_candidates(scores.text[sample], spans.start[k] + spans.extent(k), scores.queries[sample])
        kept = self.select(scores.pivot[sample], scores.directions[sample], positions, text,
                           kept_count(image.shape[0], self.config.stages[stage].keep_ratio))
        chosen = sample * seq_len + kept
        return inputs.rows_at(chosen), chosen

    def select(self, scores: torch.Tensor, directions: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
               keep: int) -> torch.Tensor:
        """Positions (sorted) of the ``keep`` tokens one image keeps; ``scores`` and ``directions`` are
        its sample's pivot scores (length,) and unit hidden states (length, d), ``image`` holds the
        image's token positions and ``text`` the positions text pivots may come from."""
        size = image.shape[0]
        image_pivots = scores[image].topk(min(self.strategy_config.image_pivots, size, keep)).indices  # indices into image
        text_count = min(self.strategy_config.text_pivots, text.shape[0])
        text_pivots = text[scores[text].topk(text_count).indices] if text_count else text[:0]
        pivots = torch.cat([image[image_pivots], text_pivots])
        remaining = keep - image_pivots.shape[0]
        shares = [remaining // pivots.shape[0] + (i < remaining % pivots.shape[0]) for i in range(pivots.shape[0])]
        available = torch.ones(size, dtype=torch.bool, device=scores.device)
        available[image_pivots] = False
        kept = [image_pivots]
        for pivot, share in zip(pivots.tolist(), shares):
            if share == 0:
                continue
            candidates = available.nonzero().squeeze(1)
            similarity = directions[image[candidates]] @ directions[pivot]
            least = candidates[similarity.topk(share, largest=False).indices]
            available[least] = False
            kept.append(least)
        return image[torch.cat(kept).sort().values]


def _visual_mask(spans: VisualSpans, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(batch * seq_len, dtype=torch.bool, device=device)
    mask[spans.token_index(list(range(len(spans))), seq_len, device)] = True
    return mask.view(batch, seq_len)


def _text_candidates(text: torch.Tensor, after: int, query: int) -> torch.Tensor:
    """Positions of a sample's real text tokens (``text``: its mask) from ``after`` up to its query token."""
    positions = torch.arange(text.shape[0], device=text.device)
    return positions[text & (positions >= after) & (positions <= query)]


def preset(geometry: ModelGeometry, keep_ratio: float = DART_KEEP_RATIO, layer: int = DART_LAYER,
           **options) -> dict:
    """DART at layer K = ``layer`` (its stage after layer K - 1), keeping ``keep_ratio`` of each image,
    with kept tokens at their original positions."""
    check_layer_k("dart", layer, geometry)
    return {"stages": [SelectionStage(layer - 1, keep_ratio=keep_ratio)], "strategy": DARTConfig(**options),
            "positions": "keep"}


register_strategy("dart", DARTConfig, DuplicationAwareSelection)
register_spec("dart", fraction_spec("dart", preset), "dart[:KEEP]", plot_style="C5P-")
