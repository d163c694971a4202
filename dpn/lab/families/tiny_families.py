"""Tiny Qwen2.5-VL and LLaVA-OneVision, built locally and saved like hub checkpoints.

What ``dpn train`` and ``dpn eval`` run on for these families in the tests (no hub): the stock
model classes with random weights of a few layers, each family's own image processor (Qwen2-VL's
resizing to multiples of the merged patch, OneVision's anyres crops), and a tokenizer trained here
(``dpn.lab.families.zoo.build_tokenizer``) with the family's special tokens and a ChatML chat template as
both families use (``<|im_start|>role ... <|im_end|>``).

Shapes, on the benchmark's 96 x 96 images:
- Qwen2.5-VL: 8-pixel patches merged 2 x 2, so an image of H x W pixels is an (H/16) x (W/16)
  grid (96 x 96: 6 x 6 = 36 tokens); 2 vision layers, a 6-layer Qwen2 text model of width 192.
- OneVision: a SigLIP tower on 48-pixel crops of 8-pixel patches (a 6 x 6 base grid), crops tiled
  up to 96 x 96 (96 x 96: the base grid + a 12 x 12 high-resolution grid with 12 row newlines =
  192 tokens); the same text model.
"""

from __future__ import annotations

import torch
from transformers import (
    LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, PreTrainedModel, Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration, Qwen2Config, SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from dpn.lab.families import zoo
from dpn.lab.data.processor import ImageTextProcessor

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
QWEN_MARKERS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
ONEVISION_VIDEO = "<video>"
DEFAULT_SYSTEM = "You are a helpful assistant."


def chatml_template(image_text: str) -> str:
    """ChatML turns; a content list's image parts become ``image_text``, its text parts their text."""
    return zoo.content_macro(image_text) + (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
        "{% endif %}"
        "<|im_start|>{{ message['role'] }}\n{{ render(message['content']) }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


PATCH = 8
MERGE = 2
CROP = 48  # OneVision's vision tower input: 6 x 6 patches
PINPOINTS = [[CROP, CROP], [CROP, 2 * CROP], [2 * CROP, CROP], [2 * CROP, 2 * CROP]]
TEXT = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
            max_position_embeddings=2048)
# M-RoPE splits the 16 rotary frequencies of a 32-wide head over time, height and width.
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]


def chatml_tokenizer(markers: tuple[str, ...], image_text: str):
    """The tiny BPE with ChatML turns; a turn's end is the end of generation."""
    tokenizer = zoo.build_tokenizer(extra_special_tokens=(CHATML_START, CHATML_END, *markers),
                                    chat_template=chatml_template(image_text))
    tokenizer.eos_token = CHATML_END
    return tokenizer


def build_tiny_qwen2_5_vl(seed: int = 0) -> tuple[PreTrainedModel, ImageTextProcessor]:
    tokenizer = chatml_tokenizer(QWEN_MARKERS, "".join(QWEN_MARKERS[:3]))
    start, image, end, video = tokenizer.convert_tokens_to_ids(list(QWEN_MARKERS))
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=TEXT["hidden_size"],
                  window_size=4 * PATCH * MERGE, fullatt_block_indexes=[1], in_channels=3)
    text = dict(vocab_size=len(tokenizer), rope_parameters=MROPE, **_token_ids(tokenizer), **TEXT)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=image, video_token_id=video,
                              vision_start_token_id=start, vision_end_token_id=end, tie_word_embeddings=False)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=(2 * PATCH * MERGE) ** 2,
        max_pixels=(8 * PATCH * MERGE) ** 2, image_mean=zoo.CLIP_MEAN, image_std=zoo.CLIP_STD,
    )
    return _model(Qwen2_5_VLForConditionalGeneration, config, tokenizer, seed), ImageTextProcessor(tokenizer, image_processor)


def build_tiny_onevision(seed: int = 0) -> tuple[PreTrainedModel, ImageTextProcessor]:
    tokenizer = chatml_tokenizer((ONEVISION_VIDEO,), zoo.IMAGE_TOKEN + "\n")
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=CROP, patch_size=PATCH)
    text = Qwen2Config(vocab_size=len(tokenizer), **_token_ids(tokenizer), **TEXT)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(zoo.IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(ONEVISION_VIDEO), image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": CROP, "width": CROP}, crop_size={"height": CROP, "width": CROP},
        image_grid_pinpoints=PINPOINTS, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
    )
    return _model(LlavaOnevisionForConditionalGeneration, config, tokenizer, seed), ImageTextProcessor(tokenizer, image_processor)


def _token_ids(tokenizer) -> dict[str, int]:
    return dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)


def _model(model_class, config, tokenizer, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = model_class(config)
    for name, value in _token_ids(tokenizer).items():
        setattr(model.generation_config, name, value)
    return model
