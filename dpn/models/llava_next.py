"""Adapter for ``LlavaNextForConditionalGeneration`` and ``LlavaOnevisionForConditionalGeneration``.

Layout of an image ("anyres"): the base grid (the whole image resized, ``side x side`` tokens),
then the high-resolution crops re-tiled into one grid and unpadded to the image's aspect ratio
(``H' x W'``), every row of which ends with an ``image_newline`` token. OneVision shrinks that
grid (bilinear) when it exceeds ``anyres_max_N`` crops, and does not tile at all in samples with
several images (then: base grid + one newline). A OneVision video is its frames' 2x2-pooled grids
one after the other, then one newline.

Each grid is pooled on its own shape. Newlines are never pooled into visual content: a pooled
high-resolution grid keeps one newline per pooled row (the one that ended the last original row
it covers; see ``dpn.runtime.layout.with_newlines``); a lone trailing newline is kept as it is.
Positions are 1-D, as in LLaVA-1.5.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from dpn.geometry import ModelGeometry
from dpn.models.base import CallInputs, ModelAdapter, PreparedBatch
from dpn.models.llava import check_text_backbone, check_vision_layout
from dpn.spans import Gap, Grid, VisualSpans, merged, spans_of_items

ANYRES_MAX_PREFIX = "anyres_max_"
# OneVision shrinks a high-resolution grid only when it exceeds its crop budget by more than this.
ONEVISION_DOWNSAMPLE_TOLERANCE = 1.1


class LlavaNextAdapter(ModelAdapter):
    model_types = ("llava_next", "llava_onevision")
    input_names = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy",
                   "pixel_values_videos", "image_sizes_videos", "vision_aspect_ratio", "batch_num_images")

    def geometry(self, config: Any) -> ModelGeometry:
        check_text_backbone(config.text_config)
        check_vision_layout(config)
        return self.text_geometry(config, None)  # the high-resolution grid depends on each image

    def prepare(self, model: nn.Module, call: CallInputs) -> PreparedBatch:
        inner, config, family = model.model, model.config, call.family
        embeds = call.inputs_embeds if call.inputs_embeds is not None else inner.get_input_embeddings()(call.input_ids)
        batch, length = embeds.shape[:2]
        positions = self.positions.initial(call.position_ids, call.attention_mask, batch, length, call.past_length,
                                           embeds.device)
        vision = {k: family[k] for k in ("vision_feature_layer", "vision_feature_select_strategy")
                  if family.get(k) is not None}
        parts = []
        if family.get("pixel_values") is not None:
            if family.get("image_sizes") is None:
                raise ValueError("LLaVA-NeXT images need image_sizes (the processor returns them)")
            extra = {k: family[k] for k in ("vision_aspect_ratio", "batch_num_images") if family.get(k) is not None}
            features = inner.get_image_features(family["pixel_values"], family["image_sizes"], return_dict=True,
                                                **vision, **extra).pooler_output
            layouts = self.image_layouts(config, family["image_sizes"], family.get("batch_num_images"),
                                         family.get("vision_aspect_ratio"))
            embeds, spans = _merge(call, embeds, config.image_token_id, features, layouts, "image")
            parts.append(spans)
        if family.get("pixel_values_videos") is not None:
            videos = family["pixel_values_videos"]
            features = inner.get_video_features(videos, return_dict=True, **vision).pooler_output
            side = math.ceil(_side(config) / 2)  # frames are 2x2-pooled (rounding up) before the LLM
            layouts = [(Grid(side, side),) * videos.shape[1] + (Gap(1),)] * videos.shape[0]
            embeds, spans = _merge(call, embeds, config.video_token_id, list(features), layouts, "video")
            parts.append(spans)
        return PreparedBatch(embeds, merged(*parts) if parts else VisualSpans(), positions)

    def image_layouts(self, config: Any, image_sizes: torch.Tensor, batch_num_images, aspect_ratio) -> list[tuple]:
        """Each image's layout: the base grid, then the unpadded high-resolution grid with a newline
        after every row (or, for a OneVision image that is not tiled, one newline)."""
        side = _side(config)
        tiled = [True] * len(image_sizes)
        if config.model_type == "llava_onevision" and batch_num_images is not None:
            tiled = [n == 1 for n in batch_num_images.tolist() for _ in range(n)]
        layouts = []
        for size, tile in zip(image_sizes.tolist(), tiled):
            if not tile:
                layouts.append((Grid(side, side), Gap(1)))
                continue
            crops_high, crops_wide = get_anyres_image_grid_shape(size, config.image_grid_pinpoints,
                                                                 config.vision_config.image_size)
            height, width = unpad_image(torch.empty(0, crops_high * side, crops_wide * side), size).shape[1:]
            if config.model_type == "llava_onevision":
                ratio_name = aspect_ratio or config.vision_aspect_ratio
                ratio = math.sqrt(height * width / (int(ratio_name.removeprefix(ANYRES_MAX_PREFIX)) * side**2))
                if ratio > ONEVISION_DOWNSAMPLE_TOLERANCE:
                    height, width = int(height // ratio), int(width // ratio)
            layouts.append((Grid(side, side), Grid(height, width, newline=True)))
        return layouts


def _side(config: Any) -> int:
    return config.vision_config.image_size // config.vision_config.patch_size


def _merge(call: CallInputs, embeds: torch.Tensor, token_id: int, features: list[torch.Tensor], layouts: list[tuple],
           kind: str) -> tuple[torch.Tensor, VisualSpans]:
    """Scatter the features into their placeholders and find their grids, checking that each
    image's features have exactly the length its layout says (never a silent misalignment)."""
    for index, (feature, layout) in enumerate(zip(features, layouts)):
        expected = sum(part.tokens for part in layout)
        if feature.shape[0] != expected:
            raise ValueError(f"{kind} {index} has {feature.shape[0]} features but its layout {layout} has {expected} "
                             "tokens; dpn does not know this family's layout for it")
    if call.input_ids is None:
        raise ValueError(f"LLaVA-NeXT {kind}s need input_ids to find their placeholders")
    mask = call.input_ids == token_id
    features = torch.cat(features).to(embeds.device, embeds.dtype)
    if int(mask.sum()) != features.shape[0]:
        raise ValueError(f"the batch has {int(mask.sum())} {kind} tokens but the {kind}s give {features.shape[0]} "
                         "features; the processor and the model disagree")
    embeds = embeds.masked_scatter(mask.unsqueeze(-1), features)
    return embeds, spans_of_items(mask & call.valid, layouts, kind)
