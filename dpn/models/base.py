"""The interface every architecture adapter implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class ModelAdapter(ABC):
    """Where a multimodal model keeps what the pyramid runtime needs. Stateless: one per architecture."""

    model_types: tuple[str, ...] = ()

    @abstractmethod
    def text_config(self, config: Any) -> Any:
        """The config of the text decoder."""

    @abstractmethod
    def visual_grid(self, config: Any) -> tuple[int, int]:
        """(rows, columns) of the visual tokens of one image, in the order they sit in the sequence."""

    @abstractmethod
    def image_token_id(self, config: Any) -> int:
        """The placeholder token id that marks visual tokens in ``input_ids``."""

    @abstractmethod
    def decoder(self, model: nn.Module) -> nn.Module:
        """The text decoder: has ``layers``, ``norm``, ``rotary_emb`` and input embeddings."""

    @abstractmethod
    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output projection to the vocabulary."""

    @abstractmethod
    def embed(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        **vision_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with image features merged in, and the (batch, seq) mask of image tokens."""

    def num_layers(self, config: Any) -> int:
        return int(self.text_config(config).num_hidden_layers)

    def hidden_size(self, config: Any) -> int:
        return int(self.text_config(config).hidden_size)
