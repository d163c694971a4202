"""Real model geometries written in code, for FLOPs tables and benchmarks with random weights.

No download: each preset is a config built from the published shapes of its parts (LLaVA-1.5,
LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL), with a typical image for the families whose grids
depend on the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import (
    CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig, Qwen2_5_VLConfig, Qwen2Config,
    SiglipVisionConfig,
)

from dpn.lab.families import family_of, zoo

# CLIP ViT-L/14 as used by LLaVA-1.5 (336 px -> 24 x 24 patches).
CLIP_L = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    patch_size=14, projection_dim=768,
)
VICUNA_7B = dict(
    vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
VICUNA_13B = dict(
    vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
    num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
QWEN2_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
QWEN2_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
)
# SigLIP so400m at 384 px as LLaVA-OneVision uses it (27 x 27 patches; the last layer dropped).
SIGLIP_SO400M = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16, image_size=384,
    patch_size=14,
)
QWEN2_5_VL_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], in_channels=3,
)
QWEN2_5_VL_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
QWEN2_5_VL_7B_TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, rope_parameters=QWEN2_5_VL_ROPE,
)
TINY_QWEN_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], in_channels=3,
)
TINY_QWEN_TEXT = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, rope_parameters={**QWEN2_5_VL_ROPE, "mrope_section": [2, 3, 3]},
)
QWEN2_5_VL_3B_TEXT = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6, rope_parameters=QWEN2_5_VL_ROPE,
    tie_word_embeddings=True,
)


def _llava(text_config: Any, image_size: int, image_token_id: int) -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, **CLIP_L),
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _qwen2_5_vl(text: dict[str, Any], vision_out: int, vision: dict[str, Any] = QWEN2_5_VL_VISION) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        vision_config={**vision, "out_hidden_size": vision_out}, text_config=text,
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )


def _llava_next() -> LlavaNextConfig:
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=336, **CLIP_L), text_config=LlamaConfig(**VICUNA_7B),
        image_token_id=32000, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


def _llava_onevision() -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**SIGLIP_SO400M), text_config=Qwen2Config(**QWEN2_7B),
        image_token_id=151646, video_token_id=151647, vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
        vision_aspect_ratio="anyres_max_9",
    )


@dataclass(frozen=True)
class Architecture:
    """A preset: its config (written in code) and, for families whose grids depend on the image, the
    typical image (height, width) its FLOPs table and benchmark batches use."""

    config: Callable[[], Any]
    image_size: tuple[int, int] | None = None


ARCHITECTURES: dict[str, Architecture] = {
    # The tiny reference model of dpn.lab.families.zoo: CLIP 3 x 128 (96 px / 8 -> 12 x 12 = 144 tokens) + Llama 6 x 192.
    "tiny": Architecture(lambda: zoo.llava_config()),
    # LLaVA-1.5-7B: CLIP-L/336 (576 visual tokens) + Vicuna-7B.
    "llava-1.5-7b": Architecture(lambda: _llava(LlamaConfig(**VICUNA_7B), 336, 32000)),
    # LLaVA-1.5-13B: CLIP-L/336 + Vicuna-13B.
    "llava-1.5-13b": Architecture(lambda: _llava(LlamaConfig(**VICUNA_13B), 336, 32000)),
    # The high-resolution geometry (LLaVA-HR): a 32 x 32 = 1024-token grid (448 px / 14) + Vicuna-7B.
    "llava-hr-7b-1024": Architecture(lambda: _llava(LlamaConfig(**VICUNA_7B), 448, 32000)),
    # A small LLaVA: CLIP-L/336 + a Qwen2-0.5B-shaped LLM.
    "qwen2-0.5b": Architecture(lambda: _llava(Qwen2Config(**QWEN2_05B), 336, 151646)),
    # Qwen2.5-VL-7B / 3B, one 1024 x 1024 image at the processor's default resizing (980 x 980: 35 x 35 tokens).
    "qwen2.5-vl-7b": Architecture(lambda: _qwen2_5_vl(QWEN2_5_VL_7B_TEXT, 3584), (1024, 1024)),
    "qwen2.5-vl-3b": Architecture(lambda: _qwen2_5_vl(QWEN2_5_VL_3B_TEXT, 2048), (1024, 1024)),
    # LLaVA-NeXT (v1.6) Vicuna-7B, a 672 x 672 image: a 24 x 24 base grid + a 48 x 48 grid with newlines.
    "llava-next-7b": Architecture(_llava_next, (672, 672)),
    # LLaVA-OneVision Qwen2-7B (SigLIP-384, anyres_max_9), one 1024 x 1024 image.
    "llava-onevision-7b": Architecture(_llava_onevision, (1024, 1024)),
    # A tiny Qwen2.5-VL (2 x 32 vision, 6 x 64 text) on a 224 x 168 image (8 x 6 tokens): smoke tests.
    "tiny-qwen2.5-vl": Architecture(lambda: _qwen2_5_vl(TINY_QWEN_TEXT, 64, vision=TINY_QWEN_VISION), (224, 168)),
}


def model_config(name: str) -> Any:
    """The config of a named architecture preset."""
    return _architecture(name).config()


def typical_layout(name: str) -> tuple:
    """The grids (``dpn.spans.Grid`` / ``Gap`` parts) of the preset's typical image."""
    architecture = _architecture(name)
    config = architecture.config()
    return family_of(config).typical_grids(config, architecture.image_size)


def _architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture preset {name!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def image_size_of(name: str) -> tuple[int, int] | None:
    return _architecture(name).image_size


def image_inputs(config: Any, image_size: tuple[int, int] | None, batch_size: int,
                 generator: torch.Generator) -> tuple[list[int], dict[str, torch.Tensor]]:
    """One random image per sample for a preset's family (``FamilyImages.random_inputs``)."""
    return family_of(config).random_inputs(config, image_size, batch_size, generator)
