"""Real model geometries written in code, for FLOPs tables and benchmarks with random weights.

No download: each preset is a ``LlavaConfig`` built from the published shapes of its parts.
"""

from __future__ import annotations

from typing import Any, Callable

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config

from dpn.lab import zoo

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


def _llava(text_config: Any, image_size: int, image_token_id: int) -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, **CLIP_L),
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


ARCHITECTURES: dict[str, Callable[[], LlavaConfig]] = {
    # The tiny reference model of dpn.lab.zoo: CLIP 3 x 128 (96 px / 8 -> 12 x 12 = 144 tokens) + Llama 6 x 192.
    "tiny": lambda: zoo.llava_config(),
    # LLaVA-1.5-7B: CLIP-L/336 (576 visual tokens) + Vicuna-7B.
    "llava-1.5-7b": lambda: _llava(LlamaConfig(**VICUNA_7B), 336, 32000),
    # LLaVA-1.5-13B: CLIP-L/336 + Vicuna-13B.
    "llava-1.5-13b": lambda: _llava(LlamaConfig(**VICUNA_13B), 336, 32000),
    # The high-resolution geometry (LLaVA-HR): a 32 x 32 = 1024-token grid (448 px / 14) + Vicuna-7B.
    "llava-hr-7b-1024": lambda: _llava(LlamaConfig(**VICUNA_7B), 448, 32000),
    # A small LLaVA: CLIP-L/336 + a Qwen2-0.5B-shaped LLM.
    "qwen2-0.5b": lambda: _llava(Qwen2Config(**QWEN2_05B), 336, 151646),
}


def llava_config(name: str) -> LlavaConfig:
    """The ``LlavaConfig`` of a named architecture preset."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture preset {name!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]()
