"""vLLM's LLaVA-1.5 with dpn's projector pooling or DivPrune (loaded by vLLM through ``dpn.lab.vllm_plugin``).

Two changes to vLLM's ``LlavaForConditionalGeneration``, nothing else: the processing info reports
the number of image tokens the saved pyramid leaves, so each ``<image>`` becomes that many
placeholders; and the image features are compressed (``ProjectorPooling`` with dpn's own
``pool_grid``, or ``DiverseSelection`` with dpn's own ``max_min_diverse``) before they fill them. The
weight mapper also reads the layout dpn saves under transformers 5 (the CLIP tower's weights
without their ``vision_model.`` prefix). Imports vLLM: only vLLM's model loader imports this module.
"""

from __future__ import annotations

import re

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from dpn.lab.vllm_plugin import saved_llava_compression
from dpn.models import geometry_of

ARCHITECTURE = "DpnLlavaForConditionalGeneration"
# transformers 5 saves LLaVA's CLIP tower as vision_tower.embeddings..., vLLM's CLIP expects
# vision_tower.vision_model.embeddings... (the Hub's llava-hf checkpoints already have it).
_TOWER_WITHOUT_WRAPPER = re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)")


def _image_grid(hf_config) -> tuple[int, int]:
    grids = geometry_of(hf_config).image_grids
    if not grids or len(grids) != 1:
        raise ValueError(f"{ARCHITECTURE} needs one fixed visual grid per image (LLaVA-1.5); this model has {grids}")
    return grids[0]


class DpnLlavaProcessingInfo(LlavaProcessingInfo):
    """Each image's placeholders: the tokens the saved pyramid leaves."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        grid = _image_grid(self.get_hf_config())
        if full != grid[0] * grid[1]:
            raise ValueError(f"{full} image features do not form the {grid[0]}x{grid[1]} grid dpn pooled in training "
                             "(vision_feature_select_strategy 'full' keeps the CLS token; use 'default')")
        return saved_llava_compression(self.ctx.model_config.model).tokens(grid)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=DpnLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder)
class DpnLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA whose projected image features are compressed as the saved dpn pyramid does it."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={_TOWER_WITHOUT_WRAPPER: r"\g<1>vision_tower.vision_model."}
    ) | LlavaForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.dpn_compression = saved_llava_compression(vllm_config.model_config.model)
        self.dpn_grid = _image_grid(self.config)

    def _process_image_input(self, image_input):
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            raise ValueError(f"{ARCHITECTURE} compresses the features it computes from images; pass images, not "
                             "image_embeds")
        features = super()._process_image_input(image_input)
        if isinstance(features, torch.Tensor):
            return self.dpn_compression.compress(features, self.dpn_grid)
        return tuple(self.dpn_compression.compress(f[None], self.dpn_grid)[0] for f in features)
