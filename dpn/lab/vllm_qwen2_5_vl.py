"""vLLM's Qwen2.5-VL with dpn's projector pooling (loaded by vLLM through ``dpn.lab.vllm_plugin``).

Three changes to vLLM's ``Qwen2_5_VLForConditionalGeneration``: each image's placeholders are the
tokens the saved pooling leaves of its merged grid (prompt updates and the processing info's count);
the image features are pooled (``ProjectorPooling.pool``, dpn's own ``pool_grid``) per image on its
own grid; and the M-RoPE positions are those dpn keeps (``dpn.models.positions``): a pooled token
carries the coordinates of its window's first token, and the text after an image continues after
the unpooled image's extent, so decoding continues as in the stock model. Videos are not pooled
here and are refused. Imports vLLM: only vLLM's model loader imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from dpn.lab.vllm_plugin import KEPT, ProjectorPooling

ARCHITECTURE = "DpnQwen2_5_VLForConditionalGeneration"
IMAGE = "image"


def _pooling(model_config) -> ProjectorPooling:
    return ProjectorPooling.from_model_dir(model_config.model, KEPT)


def _merged_grid(grid_thw: Sequence[int], merge: int) -> tuple[int, int]:
    frames, height, width = (int(v) for v in grid_thw)
    if frames != 1:
        raise ValueError(f"{ARCHITECTURE} pools images of one frame; got an image of {frames} frames")
    return height // merge, width // merge


class DpnQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Images only (videos are not pooled here), each counted as the tokens its pooled grid leaves."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {IMAGE: None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor, mm_kwargs) -> int:
        size, _ = self._get_vision_info(image_width=image_width, image_height=image_height, num_frames=1,
                                        image_processor=image_processor, mm_kwargs=mm_kwargs, modality=IMAGE)
        vision = self.get_hf_config().vision_config
        side = vision.patch_size * vision.spatial_merge_size
        return _pooling(self.ctx.model_config).tokens((size.height // side, size.width // side))


class DpnQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Each image's placeholder becomes as many image tokens as its pooled grid has."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any],
                            out_mm_kwargs) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        (image_update,) = [u for u in updates if u.modality == IMAGE]
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        pooling = _pooling(self.info.ctx.model_config)
        token = image_update.target[0]

        def pooled_placeholders(item_idx: int) -> list[int]:
            grid_thw = out_mm_kwargs[IMAGE][item_idx]["image_grid_thw"].data.tolist()
            return [token] * pooling.tokens(_merged_grid(grid_thw, merge))

        return [PromptReplacement(modality=IMAGE, target=image_update.target, replacement=pooled_placeholders),
                *(u for u in updates if u.modality != IMAGE)]


@MULTIMODAL_REGISTRY.register_processor(
    DpnQwen2_5_VLMultiModalProcessor, info=DpnQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class DpnQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL whose merged image features are pooled as the saved dpn pyramid pools them."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.dpn_pooling = _pooling(vllm_config.model_config)

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        if image_input["type"] == "image_embeds":
            raise ValueError(f"{ARCHITECTURE} pools the features it computes from images; pass images, not "
                             "image_embeds")
        merge = self.visual.spatial_merge_size
        features = super()._process_image_input(image_input)
        return tuple(self.dpn_pooling.pool(f[None], _merged_grid(thw, merge))[0]
                     for f, thw in zip(features, image_input["image_grid_thw"].tolist()))

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        pieces, consumed, next_position = [], 0, 0
        for offset, frames, height, width, _ in self.iter_mm_grid_thw(mm_features):
            text = offset - consumed
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            start = next_position + text
            rows, cols = self.dpn_pooling.window_origins((height, width))
            pieces.append(np.stack([np.zeros(len(rows), dtype=np.int64), rows, cols]) + start)
            next_position = start + max(frames, height, width)  # after the unpooled image, as the stock model
            consumed = offset + len(rows)
        text = len(input_tokens) - consumed
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        positions = np.concatenate(pieces, axis=1)
        return torch.from_numpy(positions), next_position + text - len(input_tokens)
