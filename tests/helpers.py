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
    from transformers import Qwen3Config

    if backbone == "qwen3":
        text_kwargs["head_dim"] = hidden // 4
    text = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config}[backbone](**text_kwargs)
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


# ---------------------------------------------------------------------------------- Qwen2-VL family
QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, QWEN_VISION_START, QWEN_VISION_END = 5, 6, 7, 8
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2


def tiny_qwen_vl(kind: str = "qwen2_5_vl", attn: str = "sdpa", seed: int = 0):
    """A tiny random Qwen2.5-VL (or Qwen2-VL) with a 6-layer text model: 4-pixel patches, 2x2 merge."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, \
        Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD_TOKEN_ID, bos_token_id=1,
                eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    tokens = dict(image_token_id=QWEN_IMAGE_TOKEN, video_token_id=QWEN_VIDEO_TOKEN,
                  vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END)
    if kind == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=QWEN_PATCH,
                      spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL, out_hidden_size=64,
                      window_size=16, fullatt_block_indexes=[1], in_channels=3)
        config, model_class = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens), Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=QWEN_PATCH,
                      spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL, in_channels=3)
        config, model_class = Qwen2VLConfig(vision_config=vision, text_config=text, **tokens), Qwen2VLForConditionalGeneration
    config._attn_implementation = attn
    model = model_class(config)
    model.set_attn_implementation(attn)
    return model.eval()


def qwen_prompt(grids: list[tuple[int, int]], before: int, after: int, seed: int = 0, video_frames: int = 0) -> list[int]:
    """Text, then each image (``grids`` in patches) wrapped in vision start/end tokens, then text.
    With ``video_frames``, the visual items are videos of that many frame groups instead."""
    g = torch.Generator().manual_seed(seed)
    def text(n):
        return torch.randint(10, VOCAB, (n,), generator=g).tolist()
    token = QWEN_VIDEO_TOKEN if video_frames else QWEN_IMAGE_TOKEN
    ids = text(before)
    for h, w in grids:
        ids += [QWEN_VISION_START] + [token] * (max(1, video_frames) * h * w // QWEN_MERGE**2) + [QWEN_VISION_END] + text(2)
    return ids + text(after)


def qwen_pixels(grids: list[tuple[int, int]], seed: int = 0, frames: int = 1) -> dict[str, torch.Tensor]:
    """Patchified pixel values and grid_thw for images (frames == 1) or videos of ``grids`` (in patches)."""
    g = torch.Generator().manual_seed(seed)
    patches = sum(frames * h * w for h, w in grids)
    values = torch.randn(patches, 3 * QWEN_TEMPORAL * QWEN_PATCH**2, generator=g)
    grid_thw = torch.tensor([[frames, h, w] for h, w in grids])
    if frames > 1:
        return {"pixel_values_videos": values, "video_grid_thw": grid_thw}
    return {"pixel_values": values, "image_grid_thw": grid_thw}


# ------------------------------------------------------------------------ LLaVA-NeXT / OneVision family
ANYRES_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
NEXT_TILE = 16  # the vision tower's image size: 4x4 patches of 4 pixels per crop


def tiny_llava_next(kind: str = "llava_next", attn: str = "sdpa", seed: int = 0):
    """A tiny random LLaVA-NeXT (Llama text) or LLaVA-OneVision (Qwen2 text): 16-pixel crops of 4x4
    patches, crops tiled up to 32x32 pixels."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig, \
        LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=NEXT_TILE, patch_size=PATCH, projection_dim=32)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD_TOKEN_ID)
    common = dict(vision_config=vision, image_token_id=IMAGE_TOKEN_ID, image_grid_pinpoints=ANYRES_PINPOINTS,
                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    if kind == "llava_next":
        config, model_class = LlavaNextConfig(text_config=LlamaConfig(**text), **common), LlavaNextForConditionalGeneration
    else:
        config = LlavaOnevisionConfig(text_config=Qwen2Config(**text), video_token_id=6,
                                      vision_aspect_ratio="anyres_max_9", **common)
        model_class = LlavaOnevisionForConditionalGeneration
    config._attn_implementation = attn
    model = model_class(config)
    model.set_attn_implementation(attn)
    return model.eval()


def next_text_token(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """The greedy next token with ``banned`` ids excluded, as ``generate(bad_words_ids=...)`` picks it."""
    logits = logits[:, -1].clone()
    logits[:, banned] = float("-inf")
    return logits.argmax(-1, keepdim=True)


def check_training_and_cached_generation(model, batch: dict, forced, banned: list[int]):
    """One training step through ``model``'s pyramid (finite loss, gradients reach the last layer),
    then a cached generation whose last logits equal a full recompute. Returns the training output."""
    model.train()
    out = model(**batch, force_experts=forced)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert float(model.model.language_model.layers[-1].mlp.down_proj.weight.grad.abs().sum()) > 0
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        generated = model.generate(**inputs, force_experts=forced, max_new_tokens=3, do_sample=False,
                                   pad_token_id=PAD_TOKEN_ID, bad_words_ids=[[t] for t in banned],
                                   output_logits=True, return_dict_in_generate=True)
        ids = generated.sequences[:, :-1]
        prompt = inputs["input_ids"].shape[1]
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, prompt:])], 1)
        labels = torch.full_like(ids, -100)
        labels[:, prompt:] = ids[:, prompt:]
        visual = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        recomputed = model(input_ids=ids, attention_mask=mask, labels=labels, force_experts=forced, **visual)
    torch.testing.assert_close(recomputed.logits[:, -1], generated.logits[-1], atol=1e-4, rtol=0)
    return out


def check_cached_generation_matches_recompute(model, batch: dict, forced, banned: list[int], new_tokens: int):
    """Cached ``generate`` (placeholder ids ``banned``) gives, at every step, the logits of recomputing
    the whole prefix, and the same tokens."""
    with torch.no_grad():
        generated = model.generate(**batch, force_experts=forced, max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=PAD_TOKEN_ID, bad_words_ids=[[t] for t in banned],
                                   output_logits=True, return_dict_in_generate=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompt_length = ids.shape[1]
    visual = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for step in range(new_tokens):
        labels = torch.full_like(ids, -100)
        labels[:, prompt_length:] = ids[:, prompt_length:]  # the query stays the last prompt token
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=labels, force_experts=forced, use_cache=False,
                        **visual)
        torch.testing.assert_close(out.logits[:, -1], generated.logits[step], atol=1e-4, rtol=0)
        ids = torch.cat([ids, next_text_token(out.logits, banned)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(ids, generated.sequences)


def first_layer_input(model, batch: dict):
    """(what the LLM's first decoder layer received, the output) of one no-grad forward of ``batch``."""
    received = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: received.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        hook.remove()
    return received[0], out


def qwen_forward(model, grids: list[tuple[int, int]]):
    """A no-grad forward of two Qwen2.5-VL samples, one image each of ``grids`` (text around them)."""
    batch = batch_of([qwen_prompt(grids[:1], 2, 3), qwen_prompt(grids[1:], 3, 2, seed=1)])
    batch.update(qwen_pixels(grids))
    batch["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).int()
    with torch.no_grad():
        return model(**batch)


def save_tiny_dpn(directory):
    """The lab's tiny LLaVA with the paper's pyramid, saved with its processor and routers at ``directory``;
    returns the model (eval mode) and processor."""
    import dpn
    from dpn.lab.families import zoo

    model, processor = zoo.build_tiny(seed=0)
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    zoo.save_tiny(model, processor, directory)
    dpn.save_pyramid(model, directory)
    return model.eval(), processor


def _forward_under_flop_counter(model, **forced):
    """A one-prompt forward of ``model`` (eager: the CPU sdpa kernel is not in the counter's registry),
    the batch, and the FLOPs ``FlopCounterMode`` counted over the decoder layers; the forward's own
    count must be within 2% of it."""
    import re

    import pytest
    from torch.utils.flop_counter import FlopCounterMode

    batch = batch_of([make_prompt(3, 5, seed=1)])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(**batch, pixel_values=pixels(1), **forced)
    layers = re.compile(r"language_model\.layers\.\d+$")
    measured = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if layers.search(name))
    assert out.routing.flops[0].item() == pytest.approx(measured, rel=0.02)
    return out, batch


def check_selection_flops_match_counter(config_of, keep: float | None) -> None:
    """One forward of a selection pyramid (``config_of(model)``) on the eager test model: its counted
    FLOPs within 2% of ``FlopCounterMode``'s over the decoder layers, and ``dpn flops``' path from the
    config alone the same; a one-stage selection (``keep``) keeps ``kept_count`` of the image, any
    other the forward's counts."""
    import pytest

    import dpn
    from dpn.strategies.selection import kept_count

    visual = GRID[0] * GRID[1]
    model = tiny_llava(attn="eager")
    dpn.apply_pyramid(model, config_of(model))
    out, batch = _forward_under_flop_counter(model)
    (row,) = dpn.flops.path_flops(model, dpn.get_pyramid_config(model), text_tokens=batch["input_ids"].shape[1] - visual)
    expected = out.routing.visual_tokens[0].tolist() if keep is None else [visual, kept_count(visual, keep)]
    assert row["visual_tokens"] == expected
    assert row["ratio"] == pytest.approx(out.routing.flops_ratio[0].item())


def check_routed_flops_match_counter(spec: str, expert: int, kept: list[int]) -> None:
    """One forward of the one-stage routed pyramid ``spec`` with ``expert`` forced, on the eager test
    model: its counted FLOPs within 2% of ``FlopCounterMode``'s; ``dpn flops``' paths, from the config
    alone, keep ``kept`` visual tokens, and the forced one has the forward's FLOPs ratio."""
    import pytest

    import dpn

    visual = GRID[0] * GRID[1]
    model = tiny_llava(attn="eager")
    dpn.apply_pyramid(model, dpn.presets.from_spec(spec, model.config))
    out, batch = _forward_under_flop_counter(model, force_experts=[expert])
    rows = dpn.flops.path_flops(model, dpn.get_pyramid_config(model), text_tokens=batch["input_ids"].shape[1] - visual)
    assert [row["visual_tokens"] for row in rows] == [[visual, k] for k in kept]
    assert rows[expert]["ratio"] == pytest.approx(out.routing.flops_ratio[0].item())
