"""Tiny random LLaVA models and batches built in code (no download)."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, MistralConfig

IMAGE_TOKEN_ID = 5
PAD_TOKEN_ID = 0
VOCAB = 96
IMAGE_SIZE = 32
PATCH = 4  # 8 x 8 = 64 visual tokens per image
GRID = (IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH)


def tiny_llava(
    backbone: str = "llama", attn: str = "sdpa", layers: int = 6, seed: int = 0, hidden: int = 64
) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32,
    )
    text_kwargs = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD_TOKEN_ID,
    )
    text = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[backbone](**text_kwargs)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    return model.eval()


def make_prompt(text_before: int, text_after: int, images: int = 1, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    def text(n):
        return torch.randint(10, VOCAB, (n,), generator=g).tolist()
    ids = text(text_before)
    for _ in range(images):
        ids += [IMAGE_TOKEN_ID] * (GRID[0] * GRID[1]) + text(2)
    return ids + text(text_after)


def batch_of(prompts: list[list[int]], padding_side: str = "left") -> dict[str, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), PAD_TOKEN_ID)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        if padding_side == "left":
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        else:
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
