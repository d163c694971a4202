"""Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 style: one fixed grid per image).

Any text backbone whose decoder follows the transformers v5 layout (Llama, Qwen2, Mistral, ...)
works: the runtime calls its decoder layers, rotary embedding and norm as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpn.geometry import ModelGeometry
from dpn.models.base import CallInputs, ModelAdapter, PreparedBatch
from dpn.spans import VisualSpans, find_visual_spans
from dpn.vision_cues import VisionCues, class_token_cues, feature_layer_index

# Vision towers whose sequence starts with a class token (dropped by the "default" feature strategy).
_CLASS_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}
# Text backbones whose decoder the runtime drives as it is (one rotary embedding called with the
# positions, layers taking the mask, rotary and cache); each is tested with an identity pyramid.
TEXT_BACKBONES = ("llama", "mistral", "qwen2", "qwen3")


def check_text_backbone(text_config: Any) -> None:
    if text_config.model_type not in TEXT_BACKBONES:
        raise ValueError(
            f"dpn does not support a LLaVA with a {text_config.model_type!r} text backbone: its decoder is not driven "
            f"the Llama way (e.g. Gemma3's rotary embedding takes a layer type); supported: {TEXT_BACKBONES}"
        )


def check_vision_layout(config: Any) -> None:
    """The vision tower's tokens form a grid: a known tower, and no class token kept."""
    vision = config.vision_config
    if vision.model_type not in _CLASS_TOKENS:
        raise ValueError(
            f"dpn does not know the token layout of vision tower {vision.model_type!r}; supported: {sorted(_CLASS_TOKENS)}"
        )
    if config.vision_feature_select_strategy == "full" and _CLASS_TOKENS[vision.model_type]:
        raise ValueError(
            "vision_feature_select_strategy='full' keeps the class token, so the visual tokens are not a grid; "
            "use 'default' to pool them as a pyramid"
        )


class LlavaAdapter(ModelAdapter):
    model_types = ("llava",)
    input_names = ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy", "image_sizes",
                   "mm_encoder_outputs")

    def geometry(self, config: Any) -> ModelGeometry:
        check_text_backbone(config.text_config)
        check_vision_layout(config)
        side = config.vision_config.image_size // config.vision_config.patch_size
        return self.text_geometry(config, ((side, side),), vision_cues=has_vision_cues(config))

    def prepare(self, model: nn.Module, call: CallInputs) -> PreparedBatch:
        input_ids, inputs_embeds = call.input_ids, call.inputs_embeds
        llava = model.model
        image_token_id = model.config.image_token_id
        if inputs_embeds is None:
            inputs_embeds = llava.get_input_embeddings()(input_ids)
        batch, length, _ = inputs_embeds.shape
        positions = self.positions.initial(call.position_ids, call.attention_mask, batch, length, call.past_length,
                                           inputs_embeds.device)
        family = dict(call.family)
        pixel_values = family.pop("pixel_values", None)
        # generate() encodes the images once before the prefill and passes them here.
        encoded = (family.pop("mm_encoder_outputs", None) or {}).get("image")
        if pixel_values is not None and encoded is not None:
            raise ValueError("give pixel_values or mm_encoder_outputs, not both")
        if pixel_values is None and encoded is None:  # as in the stock model, placeholders without images are text
            return PreparedBatch(inputs_embeds, VisualSpans(), positions)
        if input_ids is not None:
            image_mask = input_ids == image_token_id
        else:
            image_token = llava.get_input_embeddings()(torch.tensor(image_token_id, device=inputs_embeds.device))
            image_mask = (inputs_embeds == image_token).all(-1)
        vision = {k: v for k, v in family.items() if v is not None}
        cue_layer = None
        if call.vision_cues:
            if encoded is not None:
                raise ValueError("a strategy that reads the vision tower's attention needs pixel_values, not "
                                 "mm_encoder_outputs (the feature layer's input is not in them)")
            feature_layer = vision.get("vision_feature_layer", model.config.vision_feature_layer)
            cue_layer = feature_layer_index(feature_layer, len(_vision_layers(llava.vision_tower)))
            vision["output_hidden_states"] = [cue_layer, cue_layer + 1]  # the layer's input and output
        if encoded is None:
            encoded = llava.get_image_features(pixel_values=pixel_values, return_dict=True, **vision)
        features = encoded.pooler_output
        features = torch.cat(list(features), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        if int(image_mask.sum()) != features.shape[0]:
            raise ValueError(
                f"the batch has {int(image_mask.sum())} image tokens but the images give {features.shape[0]} "
                "visual features; each image needs exactly one run of image tokens of the grid's size"
            )
        inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), features)
        spans = find_visual_spans(image_mask & call.valid, call.geometry.image_grids)
        cues = None if cue_layer is None else _class_token_cues(llava, encoded, cue_layer)
        return PreparedBatch(inputs_embeds, spans, positions, vision_cues=cues)


def has_vision_cues(config: Any) -> bool:
    """A CLIP-style tower with a class token that LLaVA drops, and one feature layer."""
    return (bool(_CLASS_TOKENS.get(config.vision_config.model_type)) and isinstance(config.vision_feature_layer, int)
            and config.vision_feature_select_strategy == "default")


def _vision_layers(tower: nn.Module) -> nn.ModuleList:
    """The tower's encoder layers (CLIPVisionModel keeps its encoder on itself, or on ``vision_model``
    in other releases)."""
    holder = getattr(tower, "vision_model", tower)
    return holder.encoder.layers


def _class_token_cues(llava: nn.Module, encoded: Any, layer_index: int) -> VisionCues:
    """The feature layer's cues of every image (in the order their features were merged)."""
    states = encoded.hidden_states
    if states is None or states[layer_index] is None or states[layer_index + 1] is None:
        raise ValueError("the vision tower did not return the feature layer's input and output hidden states")
    layer = _vision_layers(llava.vision_tower)[layer_index]
    return class_token_cues(layer, states[layer_index], states[layer_index + 1], llava.multi_modal_projector)
