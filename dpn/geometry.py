"""The shape of a multimodal model as a pyramid sees it, resolved once from the model's config.

An adapter (``dpn.models``) reads a family's config into a :class:`ModelGeometry`; presets,
validation, FLOPs and the strategies take the geometry instead of asking the adapter again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelGeometry:
    """Attributes:
        model_type: the multimodal model's ``config.model_type`` (``llava``, ...).
        text_config: the text decoder's config (heads, widths: what ``dpn.flops`` counts).
        num_layers: decoder layers of the LLM.
        hidden_size: width of the LLM's hidden states (what routers read).
        image_token_id: the placeholder id of visual tokens in ``input_ids``.
        image_grids: the 2D grids (rows, cols) of one image's visual tokens, in sequence order
            (LLaVA-1.5: one 24x24 grid); None when the grids vary from image to image and are only
            known per call (Qwen2-VL).
        position_modes: the ``PyramidConfig.positions`` modes the family's position policy supports,
            its default first.
        vision_cues: whether the adapter can give ``dpn.vision_cues.VisionCues`` (a vision tower
            with a class token, one feature layer) to strategies that read them.
    """

    model_type: str
    text_config: Any
    num_layers: int
    hidden_size: int
    image_token_id: int
    image_grids: tuple[tuple[int, int], ...] | None
    position_modes: tuple[str, ...] = ("renumber", "keep")
    vision_cues: bool = False

    @property
    def image_tokens(self) -> int:
        """Visual tokens of one image (with a fixed layout)."""
        if self.image_grids is None:
            raise ValueError(f"{self.model_type} images have no fixed number of visual tokens")
        return sum(rows * cols for rows, cols in self.image_grids)

    def fingerprint(self) -> dict[str, str]:
        """What a saved pyramid must match to be loaded into a model (stored beside its weights)."""
        grids = None if self.image_grids is None else [list(g) for g in self.image_grids]
        return {
            "model_type": str(self.model_type),
            "num_layers": str(self.num_layers),
            "hidden_size": str(self.hidden_size),
            # One grid is written as version 1 wrote it, so its checkpoints still match.
            "visual_grid": json.dumps(grids[0] if grids is not None and len(grids) == 1 else grids),
        }
