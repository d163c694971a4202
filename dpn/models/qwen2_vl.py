"""Adapter for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

Layout: the vision tower merges 2x2 patches, so an image with ``image_grid_thw = (t, h, w)`` (in
patches) is ``t`` frame grids of ``h/2 x w/2`` visual tokens; images in one batch have different
grids, and a video (``video_grid_thw``) is a sequence of such frame grids. Each frame grid is pooled
on its own shape; a stride that does not divide it pools the remainder row / column as a smaller
window (``dpn.spans.pool_grid``), so any stride runs on any grid.

Positions are M-RoPE (three axes, ``MultimodalRotaryPositions``): computed per call with the
model's own ``get_rope_index`` (or taken from ``position_ids`` when given, as ``generate`` does);
pooled and kept tokens keep their coordinates, and the per-sample rope delta travels in the
``PyramidCache`` (never on the model), so decoding continues exactly as in the stock model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpn.geometry import ModelGeometry
from dpn.models.base import CallInputs, ModelAdapter, PreparedBatch
from dpn.models.positions import LinearPositions, MultimodalRotaryPositions
from dpn.spans import VisualSpans, merged, spans_of_items

ROPE_DELTAS = "rope_deltas"
# mm_token_type_ids, as the processor writes them: 0 text, 1 image, 2 video.
IMAGE_TYPE, VIDEO_TYPE = 1, 2
# Text-only and decoding calls start from 1-D input positions (then add the prefill's rope delta).
TEXT_POSITIONS = LinearPositions()


class Qwen2VLAdapter(ModelAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    input_names = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids",
                   "second_per_grid_ts")
    positions = MultimodalRotaryPositions()

    def geometry(self, config: Any) -> ModelGeometry:
        return self.text_geometry(config, None)  # grids vary per image: known per call

    def prepare(self, model: nn.Module, call: CallInputs) -> PreparedBatch:
        qwen, family = model.model, call.family
        embeds = call.inputs_embeds if call.inputs_embeds is not None else qwen.get_input_embeddings()(call.input_ids)
        image_mask, video_mask = (m.squeeze(-1) for m in qwen.get_placeholder_mask(call.input_ids, inputs_embeds=embeds))
        merge = self.spatial_merge(model)
        parts = []
        for kind, mask, pixels, grid_key, encode in (
            ("image", image_mask, "pixel_values", "image_grid_thw", qwen.get_image_features),
            ("video", video_mask, "pixel_values_videos", "video_grid_thw", qwen.get_video_features),
        ):
            if family.get(pixels) is None:  # as in the stock model, placeholders without pixels are text
                continue
            grid_thw = family.get(grid_key)
            if grid_thw is None:
                raise ValueError(f"{pixels} needs {grid_key} (the processor returns both)")
            features = torch.cat(encode(family[pixels], grid_thw, return_dict=True).pooler_output)
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(f"the batch has {int(mask.sum())} {kind} tokens but the {kind}s give "
                                 f"{features.shape[0]} features; {grid_key} and the prompts disagree")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.device, embeds.dtype))
            parts.append(spans_of_items(mask & call.valid, frame_grids(grid_thw, merge), kind))
        spans = merged(*parts) if parts else VisualSpans()
        return PreparedBatch(embeds, spans, self._positions(model, call, bool(parts), embeds.shape[:2]))

    def spatial_merge(self, model: nn.Module) -> int:
        return int(model.config.vision_config.spatial_merge_size)

    def _positions(self, model: nn.Module, call: CallInputs, has_vision: bool, shape) -> torch.Tensor:
        """(3, batch, length) positions: given, computed by ``get_rope_index``, or (text-only and
        decoding calls) the input positions plus the prefill's rope delta kept in the cache."""
        batch, length = shape
        device = call.valid.device
        given = call.position_ids
        if given is not None:
            if given.ndim == 3 and given.shape[0] == 4:  # generate's layout: text positions first, then M-RoPE
                return given[1:].to(device)
            if given.ndim == 3 and given.shape[0] == 3:
                return given.to(device)
            if given.ndim == 2:  # 1-D positions on every axis, as the stock text model reads them
                return given.to(device)[None].expand(3, batch, length)
            raise ValueError(f"position_ids must be (3, batch, tokens), (4, batch, tokens) or (batch, tokens); "
                             f"got shape {tuple(given.shape)}")
        state = call.cache.family_state if call.cache is not None else {}
        if has_vision:
            if call.input_ids is None or call.past_length:
                raise ValueError("images with inputs_embeds, or after cached tokens, need position_ids: Qwen2-VL's "
                                 "3-axis positions are computed from the whole prompt's input_ids")
            mask = call.attention_mask if call.attention_mask is not None else torch.ones_like(call.input_ids)
            positions, deltas = model.model.get_rope_index(
                call.input_ids, mm_token_type_ids=self._token_types(model, call), attention_mask=mask,
                image_grid_thw=call.family.get("image_grid_thw"), video_grid_thw=call.family.get("video_grid_thw"),
                second_per_grid_ts=call.family.get("second_per_grid_ts"),
            )
            state[ROPE_DELTAS] = deltas.to(device)
            return positions.to(device)
        text = TEXT_POSITIONS.initial(None, call.attention_mask, batch, length, call.past_length, device)
        if ROPE_DELTAS in state:
            text = text + state[ROPE_DELTAS]
        return text[None].expand(3, batch, length)

    def _token_types(self, model: nn.Module, call: CallInputs) -> torch.Tensor:
        given = call.family.get("mm_token_type_ids")
        if given is not None:
            if given.shape != call.input_ids.shape:
                raise ValueError(f"mm_token_type_ids has shape {tuple(given.shape)} but input_ids "
                                 f"{tuple(call.input_ids.shape)}; pass the processor's, or none (dpn derives them)")
            return given
        ids = call.input_ids
        types = torch.zeros_like(ids, dtype=torch.int)
        types[ids == model.config.image_token_id] = IMAGE_TYPE
        types[ids == model.config.video_token_id] = VIDEO_TYPE
        return types


def frame_grids(grid_thw: torch.Tensor, merge: int) -> list[tuple[tuple[int, int], ...]]:
    """Per image or video, its frame grids in visual tokens: ``t`` grids of ``(h / merge, w / merge)``."""
    return [((h // merge, w // merge),) * t for t, h, w in grid_thw.tolist()]
