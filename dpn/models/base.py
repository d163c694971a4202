"""The contract between the pyramid runtime and one multimodal model family.

An adapter is stateless, one per family, registered by ``config.model_type``. It says where the
family keeps what the runtime needs (the text decoder, the LM head), reads the family's config
into a ``ModelGeometry``, declares the family's own forward arguments (``input_names``: pixel
values, image sizes, grid shapes, ...), and *prepares* a batch: the embeddings with visual
features merged in, every grid of visual tokens (an image may be several grids, each with its own
shape), the input positions (1-D or multi-axis, by its ``positions`` policy) and any extra
arguments its decoder layers need. The runtime never names a family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dpn.geometry import ModelGeometry
from dpn.models.positions import LinearPositions
from dpn.spans import VisualSpans
from dpn.vision_cues import VisionCues


@dataclass
class CallInputs:
    """What the runtime has resolved about a call before the adapter prepares it."""

    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    valid: torch.Tensor  # (batch, length) bool: real tokens of this call, not padding
    past_length: int  # tokens already in the cache
    family: dict[str, Any]  # the adapter's own ``input_names`` that the call gave
    geometry: ModelGeometry  # the model's, resolved once when the pyramid was applied
    cache: Any = None  # the call's PyramidCache (None without one): ``family_state`` carries state to decoding
    vision_cues: bool = False  # the strategy reads ``VisionCues`` (only asked of families whose geometry has them)


@dataclass
class PreparedBatch:
    hidden: torch.Tensor  # (batch, length, d): embeddings with visual features merged in
    spans: VisualSpans  # every grid of visual tokens (none when the call brings no images)
    positions: torch.Tensor  # the input positions, in the adapter's policy's shape
    layer_arguments: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of every decoder layer
    vision_cues: VisionCues | None = None  # when the call asked for them and brought images


class ModelAdapter(ABC):
    """Where a multimodal model keeps what the pyramid runtime needs."""

    model_types: tuple[str, ...] = ()
    input_names: tuple[str, ...] = ()
    positions = LinearPositions()

    @abstractmethod
    def geometry(self, config: Any) -> ModelGeometry:
        """The family's config read into a ``ModelGeometry`` (raises ``ValueError`` for layouts dpn cannot pool)."""

    def decoder(self, model: nn.Module) -> nn.Module:
        """The text decoder: has ``layers``, ``norm``, ``rotary_emb`` and input embeddings (where every
        supported family keeps it)."""
        return model.model.language_model

    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output projection to the vocabulary."""
        return model.lm_head

    def text_geometry(self, config: Any, image_grids: tuple[tuple[int, int], ...] | None,
                      vision_cues: bool = False) -> ModelGeometry:
        """A ``ModelGeometry`` from the ``text_config`` of a family that keeps one."""
        text = config.text_config
        return ModelGeometry(
            model_type=config.model_type, text_config=text, num_layers=int(text.num_hidden_layers),
            hidden_size=int(text.hidden_size), image_token_id=int(config.image_token_id), image_grids=image_grids,
            position_modes=self.positions.modes, vision_cues=vision_cues,
        )

    @abstractmethod
    def prepare(self, model: nn.Module, call: CallInputs) -> PreparedBatch:
        """Embeddings, visual grids and input positions of a call (see ``PreparedBatch``)."""
