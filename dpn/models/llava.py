"""Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 style: one fixed grid per image).

Any text backbone whose decoder follows the transformers v5 layout (Llama, Qwen2, Mistral, ...)
works: the runtime calls its decoder layers, rotary embedding and norm as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpn.models.base import ModelAdapter

# Vision towers whose sequence starts with a class token (dropped by the "default" feature strategy).
_CLASS_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}


class LlavaAdapter(ModelAdapter):
    model_types = ("llava",)

    def text_config(self, config: Any) -> Any:
        return config.text_config

    def image_token_id(self, config: Any) -> int:
        return int(config.image_token_id)

    def visual_grid(self, config: Any) -> tuple[int, int]:
        vision = config.vision_config
        if vision.model_type not in _CLASS_TOKENS:
            raise ValueError(
                f"dpn does not know the token layout of vision tower {vision.model_type!r}; "
                f"supported: {sorted(_CLASS_TOKENS)}"
            )
        side = vision.image_size // vision.patch_size
        class_tokens = _CLASS_TOKENS[vision.model_type]
        if config.vision_feature_select_strategy == "full" and class_tokens:
            raise ValueError(
                "vision_feature_select_strategy='full' keeps the class token, so the visual tokens are not a grid; "
                "use 'default' to pool them as a pyramid"
            )
        return side, side

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def embed(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        **vision_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        llava = model.model
        if inputs_embeds is None:
            inputs_embeds = llava.get_input_embeddings()(input_ids)
            image_mask = input_ids == model.config.image_token_id
        else:
            image_token = llava.get_input_embeddings()(
                torch.tensor(model.config.image_token_id, device=inputs_embeds.device)
            )
            image_mask = (inputs_embeds == image_token).all(-1)
        if pixel_values is None:
            return inputs_embeds, image_mask
        features = llava.get_image_features(pixel_values=pixel_values, return_dict=True, **vision_kwargs).pooler_output
        features = torch.cat(list(features), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        if int(image_mask.sum()) != features.shape[0]:
            raise ValueError(
                f"the batch has {int(image_mask.sum())} image tokens but the images give {features.shape[0]} "
                "visual features; each image needs exactly one run of image tokens of the grid's size"
            )
        inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), features)
        return inputs_embeds, image_mask
