"""VisionZip: dominant and contextual visual tokens (Yang et al., "VisionZip: Longer is Better but
Not Necessary in Vision Language Models", CVPR 2025, arXiv 2412.04467). Training-free.

Before the LLM, each image's tokens are replaced by ``keep_ratio`` of their number:
- *dominant* tokens: the class token and the patches it attends to most in the vision tower's
  feature layer (heads summed), in their original order, class token first;
- *contextual* tokens, ``contextual_share`` of the budget: the other patches, in order, are
  compared by their keys in that layer (mean over heads, cosine); every ``step``-th of them is a
  target (step = remaining // contextual), each other patch joins its most similar target, and a
  contextual token is the target's feature plus the mean feature of the patches that joined it.
Both go through the model's projector, so a contextual token is a new token, not one of the image's.

Differences from the reference code (dvlab-research/VisionZip, ``CLIPVisionTower_VisionZip`` and
``CLIPAttention_forward``): the class-token attention and the keys are recomputed for the feature
layer alone (the reference patches every CLIP layer's forward to return them); batches of images
any size (the reference's list branch is broken; its tensor branch is batched); the class token
takes the position of the image's first patch, a contextual token its target's (the reference
numbers all of them consecutively, as ``positions="renumber"`` does, the preset's choice).
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
from dpn.strategies.vispruner import check_class_token_geometry
from dpn.vision_cues import VisionCues, cues_of_spans

# The reference's README budget (54 dominant + 10 contextual = 64 of 576); its splits for 128 and
# 192 tokens (108 + 20, 162 + 30) keep the same contextual share.
VISIONZIP_KEEP_RATIO = 64 / 576
VISIONZIP_CONTEXTUAL_SHARE = 10 / 64


@dataclass
class VisionZipConfig(BeforeLLMSelectionConfig):
    """One stage at layer -1 (before the LLM); ``contextual_share`` of each image's tokens are
    merged contextual tokens, the rest dominant (the class token among them)."""

    name = "visionzip"
    contextual_share: float = VISIONZIP_CONTEXTUAL_SHARE

    def __post_init__(self) -> None:
        value = self.contextual_share
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"contextual_share must be a number in [0, 1), got {value!r}")
        self.contextual_share = float(value)

    def check_geometry(self, stages: list[SelectionStage], geometry: ModelGeometry) -> None:
        super().check_geometry(stages, geometry)
        check_class_token_geometry(self.name, geometry)


def token_budget(patches: int, keep_ratio: float, contextual_share: float) -> tuple[int, int]:
    """(dominant tokens with the class token, contextual tokens) for an image of ``patches``: at
    least the class token and one patch are dominant."""
    total = max(2, kept_count(patches, keep_ratio))
    contextual = min(round(total * contextual_share), total - 2)
    return total - contextual, contextual


class DominantContextual(ImageByImage):
    """Replaces each image's tokens with its dominant and contextual tokens (see the module docstring)."""

    options: VisionZipConfig
    reads_vision_cues = True

    def stage_context(self, stage: int, inputs: StageInput) -> VisionCues:
        return cues_of_spans(inputs.vision_cues, inputs.spans, "visionzip")

    def image_tokens(self, stage: int, inputs: StageInput, cues: VisionCues, k: int,
                     image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dominant_count, contextual_count = token_budget(image.shape[0], self.config.stages[stage].keep_ratio,
                                                        self.strategy_config.contextual_share)
        dominant, targets, contextual = dominant_and_contextual(
            cues.attention[k], cues.keys[k], cues.features[k], dominant_count - 1, contextual_count)
        features = torch.cat([cues.class_feature[k: k + 1], cues.features[k][dominant], contextual])
        first_patch = dominant.new_zeros(1)  # where the class token stands
        return cues.projector(features.to(cues.features.dtype)), image[torch.cat([first_patch, dominant, targets])]


def dominant_and_contextual(attention: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, dominant: int,
                            contextual: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one image's patches: the ``dominant`` most attended (sorted), the contextual targets
    (patch indices) and the ``contextual`` merged features (target + mean of its members)."""
    count = attention.shape[0]
    chosen = attention.topk(min(dominant, count)).indices.sort().values
    rest = torch.ones(count, dtype=torch.bool, device=attention.device)
    rest[chosen] = False
    remaining = rest.nonzero().squeeze(1)  # in order
    if contextual == 0 or remaining.numel() == 0:
        return chosen, remaining[:0], features[:0]
    contextual = min(contextual, remaining.numel())
    step = max(1, remaining.numel() // contextual)
    is_target = torch.zeros(remaining.numel(), dtype=torch.bool, device=attention.device)
    is_target[torch.arange(0, remaining.numel(), step, device=attention.device)[:contextual]] = True
    targets, members = remaining[is_target], remaining[~is_target]
    unit = F.normalize(keys[remaining].float(), dim=-1)
    joins = (unit[~is_target] @ unit[is_target].T).argmax(-1)  # each member's most similar target
    assignment = F.one_hot(joins, targets.numel()).to(features.dtype)  # (members, targets)
    counts = assignment.sum(0).clamp(min=1).unsqueeze(1)
    merged = features[targets] + assignment.T @ features[members] / counts
    return chosen, targets, merged


def preset(geometry: ModelGeometry, keep_ratio: float = VISIONZIP_KEEP_RATIO, **options) -> dict:
    """VisionZip before the LLM keeping ``keep_ratio`` of each image's token count, positions
    renumbered as in the reference."""
    return {"stages": [SelectionStage(BEFORE_FIRST_LAYER, keep_ratio=keep_ratio)],
            "strategy": VisionZipConfig(**options), "positions": "renumber"}


register_strategy("visionzip", VisionZipConfig, DominantContextual)
register_spec("visionzip", kept_tokens_spec("visionzip", preset), "visionzip[:KEEP | :Nt]", plot_style="C9p-")
