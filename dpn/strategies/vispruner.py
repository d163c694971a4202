"""VisPruner: visual-cue token pruning (Zhang et al., "Beyond Text-Visual Attention: Exploiting
Visual Cues for Effective Token Pruning in VLMs", ICCV 2025, arXiv 2412.01818). Training-free.

Before the LLM, each image keeps ``keep_ratio`` of its visual tokens in two parts:
- *important* tokens, ``important_ratio`` of the budget: the patches the vision tower's class token
  attends to most in the feature layer (LLaVA-1.5: CLIP layer -2), averaged over heads;
- *diverse* tokens, the rest: from the remaining patches (in descending attention), duplicates are
  removed by rounds of bipartite matching on the patches' pre-projector features: the remaining
  list is split into even and odd places, each even-place token scored by its highest cosine
  similarity to an odd-place one, and up to 8 of the highest-scoring even-place tokens dropped per
  round, until the diverse budget is left.
Kept tokens stay in their original order and, as in the reference, get renumbered positions.

Differences from the reference code (Theia-4869/VisPruner, ``LlavaMetaForCausalLM.encode_images``):
the class-token attention is recomputed for the feature layer alone (the reference runs every
CLIP layer eagerly with ``output_attentions``); batches of any size (the reference flattens the
batch into one sample); a round never drops more even-place tokens than there are, so an odd
remaining list works (the reference's index shapes assume an even one). The budget is a fraction
of each image's tokens (``vispruner:KEEP``; 128 of LLaVA-1.5's 576 is 0.222).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpn.geometry import ModelGeometry
from dpn.strategies.base import BEFORE_FIRST_LAYER, StageInput, register_spec, register_strategy
from dpn.strategies.selection import (
    BeforeLLMSelectionConfig, ImageByImage, SelectionStage, kept_count, kept_tokens_spec,
)
from dpn.vision_cues import VisionCues, cues_of_spans

# The reference's README budget (128 of 576 tokens) and its default share of important tokens.
VISPRUNER_KEEP_RATIO = 128 / 576
VISPRUNER_IMPORTANT_RATIO = 0.5
# Even-place tokens dropped per matching round at most (the reference's constant).
DUPLICATES_PER_ROUND = 8


@dataclass
class VisPrunerConfig(BeforeLLMSelectionConfig):
    """One stage at layer -1 (before the LLM); ``important_ratio`` of each image's kept tokens are
    chosen by the class token's attention, the rest for diversity."""

    name = "vispruner"
    important_ratio: float = VISPRUNER_IMPORTANT_RATIO

    def __post_init__(self) -> None:
        value = self.important_ratio
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"important_ratio must be a number in [0, 1], got {value!r}")
        self.important_ratio = float(value)

    def check_geometry(self, stages: list[SelectionStage], geometry: ModelGeometry) -> None:
        super().check_geometry(stages, geometry)
        check_class_token_geometry(self.name, geometry)


def check_class_token_geometry(name: str, geometry: ModelGeometry) -> None:
    """A ``ValueError`` unless the family gives vision cues (a tower with a class token)."""
    if not geometry.vision_cues:
        raise ValueError(
            f"{name} ranks patches by the vision tower's class-token attention, which dpn reads on LLaVA-1.5 with a "
            f"CLIP tower (one feature layer, 'default' feature selection); {geometry.model_type!r} with this config "
            "has none"
        )


class VisualCueSelection(ImageByImage):
    """Keeps each image's important and diverse tokens (see the module docstring)."""

    options: VisPrunerConfig
    reads_vision_cues = True

    def stage_context(self, stage: int, inputs: StageInput) -> VisionCues:
        return cues_of_spans(inputs.vision_cues, inputs.spans, "vispruner")

    def image_tokens(self, stage: int, inputs: StageInput, cues: VisionCues, k: int,
                     image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = kept_count(image.shape[0], self.config.stages[stage].keep_ratio)
        kept = important_and_diverse(cues.attention[k], cues.features[k], keep, self.strategy_config.important_ratio)
        return inputs.rows_at(image[kept]), image[kept]


def important_and_diverse(importance: torch.Tensor, features: torch.Tensor, keep: int,
                          important_ratio: float) -> torch.Tensor:
    """Indices (sorted) of ``keep`` tokens: the ``int(keep * important_ratio)`` most important, then
    the rest of the remaining list (by descending importance) thinned by duplicate removal."""
    keep = min(keep, importance.shape[0])
    important_count = int(keep * important_ratio)
    diverse_count = keep - important_count
    order = importance.argsort(descending=True)
    important, residual = order[:important_count], order[important_count:]
    unit = F.normalize(features.float(), dim=-1)
    while diverse_count > 0 and residual.shape[0] > diverse_count:
        even, odd = residual[0::2], residual[1::2]
        drop = min(DUPLICATES_PER_ROUND, residual.shape[0] - diverse_count, even.shape[0])
        similarity = (unit[even] @ unit[odd].T).max(-1).values  # odd is not empty: residual has 2+ tokens
        distinct = similarity.argsort(descending=True)[drop:]  # the most duplicated go first
        residual = torch.cat([even[distinct], odd])
    selected = torch.cat([important, residual[:diverse_count]]) if diverse_count > 0 else important
    return selected.sort().values


def preset(geometry: ModelGeometry, keep_ratio: float = VISPRUNER_KEEP_RATIO, **options) -> dict:
    """VisPruner before the LLM keeping ``keep_ratio`` of each image, positions renumbered as in the
    reference (LLaVA numbers what it keeps consecutively)."""
    positions = "renumber" if "renumber" in geometry.position_modes else geometry.position_modes[0]
    return {"stages": [SelectionStage(BEFORE_FIRST_LAYER, keep_ratio=keep_ratio)],
            "strategy": VisPrunerConfig(**options), "positions": positions}


register_strategy("vispruner", VisPrunerConfig, VisualCueSelection)
register_spec("vispruner", kept_tokens_spec("vispruner", preset), "vispruner[:KEEP | :Nt]", plot_style="C8X-")
