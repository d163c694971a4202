"""DivPrune: diversity-based visual token pruning (Alvar et al., "DivPrune: Diversity-based Visual
Token Pruning for Large Multimodal Models", CVPR 2025). Training-free.

Before the first decoder layer, each image keeps the subset of its visual tokens (as the LLM
receives them: after the projector) that is most *diverse*: a greedy solution of the max-min
diversity problem on cosine distances. The first kept token is the one farthest from its nearest
neighbour; each next one is the token whose distance to the nearest kept token is largest. Kept
tokens stay in their order and, as in the reference, get renumbered positions.

Differences from the reference code (vbdi/divprune, ``LlavaMetaForCausalLM.DivPrune``; batch size
1, the image found at a fixed offset of 35 tokens, distances in the model's dtype): every image of
every sample is pruned on its own, in one batch; distances are computed in float32; LLaVA-NeXT's
row newlines are layout, not candidates (the reference ranks them with the visual tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpn.geometry import ModelGeometry
from dpn.strategies.base import (
    BEFORE_FIRST_LAYER, StageInput, register_spec, register_strategy,
)
from dpn.strategies.selection import (
    BeforeLLMSelectionConfig, ImageByImage, SelectionStage, kept_count, kept_tokens_spec,
)

# The reference's default subset ratio (run_Divprune.sh): 56 of LLaVA-1.5's 576 visual tokens.
DIVPRUNE_KEEP_RATIO = 0.098


@dataclass
class DivPruneConfig(BeforeLLMSelectionConfig):
    """One stage at layer -1 (before the LLM) keeping ``keep_ratio`` of each image."""

    name = "divprune"


class DiversitySelection(ImageByImage):
    """Keeps each image's most diverse tokens (see the module docstring)."""

    options: DivPruneConfig

    def image_tokens(self, stage: int, inputs: StageInput, context: None, k: int,
                     image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = inputs.rows_at(image)
        kept = max_min_diverse(rows, kept_count(image.shape[0], self.config.stages[stage].keep_ratio))
        return rows[kept], image[kept]


def max_min_diverse(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (sorted) of ``keep`` rows of ``tokens`` (n, d) chosen greedily for the largest
    smallest cosine distance between chosen rows: first the row farthest from its nearest other
    row, then each time the row farthest from every row chosen so far."""
    count = tokens.shape[0]
    keep = min(keep, count)
    unit = F.normalize(tokens.float(), dim=-1)
    distance = 1 - unit @ unit.T
    if count == 1:
        return torch.zeros(1, dtype=torch.long, device=tokens.device)
    itself = torch.eye(count, dtype=torch.bool, device=distance.device)
    others = distance.masked_fill(itself, float("inf"))  # a row is not its own neighbour
    first = others.min(0).values.argmax()
    chosen = [first]
    nearest = distance[first].clone()  # each row's distance to its nearest chosen row
    nearest[first] = -float("inf")
    for _ in range(keep - 1):
        pick = nearest.argmax()
        chosen.append(pick)
        nearest = torch.minimum(nearest, distance[pick])
        nearest[torch.stack(chosen)] = -float("inf")
    return torch.stack(chosen).sort().values


def preset(geometry: ModelGeometry, keep_ratio: float = DIVPRUNE_KEEP_RATIO, **options) -> dict:
    """DivPrune before the LLM keeping ``keep_ratio`` of each image, positions renumbered (as the
    reference, whose LLM assigns consecutive positions to what it keeps)."""
    positions = "renumber" if "renumber" in geometry.position_modes else geometry.position_modes[0]  # M-RoPE: keep
    return {"stages": [SelectionStage(BEFORE_FIRST_LAYER, keep_ratio=keep_ratio)],
            "strategy": DivPruneConfig(**options), "positions": positions}


register_strategy("divprune", DivPruneConfig, DiversitySelection)
register_spec("divprune", kept_tokens_spec("divprune", preset), "divprune[:KEEP | :Nt]", plot_style="C6h-")
