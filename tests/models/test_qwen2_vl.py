"""Qwen2-VL / Qwen2.5-VL: the invariants on tiny random models, with images of different sizes in one
batch, left padding, a text-only sample, a two-image sample, and videos."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dpn
from dpn.strategies.selection import kept_count
from dpn.compat import cache_keyword, output_cache
from helpers import (
    PAD_TOKEN_ID, QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, batch_of, check_cached_generation_matches_recompute,
    check_training_and_cached_generation, next_text_token, qwen_pixels, qwen_prompt, tiny_qwen_vl,
)

# Images in patches: 8x12 -> a 4x6 grid (24 tokens), 10x14 -> 5x7 (35: 2x2 leaves a remainder), and a
# sample with two images 8x8 -> 4x4 (16) and 12x8 -> 6x4 (24); then a text-only sample.
IMAGES = [[(8, 12)], [(10, 14)], [(8, 8), (12, 8)], []]
STAGES = (1, 2, 4)
# Generated tokens must stay text: a random model could emit a placeholder id, which a recomputed
# prefill would read as one more image token.
NO_PLACEHOLDERS = [[QWEN_IMAGE_TOKEN], [QWEN_VIDEO_TOKEN]]
MIXED = [[(1, 1), (1, 2), (2, 2)]] * 3
FORCED = torch.tensor([[2, 1, 0], [1, 2, 1], [0, 2, 2], [-1, -1, -1]])


def qwen_batch(images=IMAGES, seed: int = 0, frames: int = 1, padding_side: str = "left", labels: bool = False):
    prompts = [qwen_prompt(grids, before=2 + i, after=3, seed=seed + i, video_frames=frames if frames > 1 else 0)
               for i, grids in enumerate(images)]
    batch = batch_of(prompts, padding_side=padding_side)
    ids = batch["input_ids"]
    # As the processor returns them: 0 text, 1 image, 2 video (generate computes positions from them).
    batch["mm_token_type_ids"] = (ids == QWEN_IMAGE_TOKEN).int() + 2 * (ids == QWEN_VIDEO_TOKEN).int()
    batch.update(qwen_pixels([g for grids in images for g in grids], seed=seed, frames=frames))
    if labels:
        ids = batch["input_ids"]
        batch["labels"] = ids.masked_fill((batch["attention_mask"] == 0) | (ids == QWEN_IMAGE_TOKEN)
                                          | (ids == QWEN_VIDEO_TOKEN), -100)
    return batch


def pyramid(experts=MIXED, **kwargs) -> dpn.PyramidConfig:
    stages = [dpn.PoolingStage(layer, list(e)) for layer, e in zip(STAGES, experts)]
    return dpn.presets.build({"stages": stages, "strategy": dpn.DPNConfig(min_tokens_to_pool=4)},
                             positions="keep", **kwargs)


def grid_after(grid: tuple[int, int], path: list[tuple[int, int]], min_tokens: int = 4) -> list[int]:
    """The documented rule: each stage pools a grid of at least ``min_tokens`` into ceil-sized windows."""
    counts = [grid[0] * grid[1]]
    for kh, kw in path:
        if grid[0] * grid[1] >= min_tokens:
            grid = (math.ceil(grid[0] / kh), math.ceil(grid[1] / kw))
        counts.append(grid[0] * grid[1])
    return counts


@pytest.mark.parametrize("kind, attn, frames", [
    ("qwen2_5_vl", "sdpa", 1), ("qwen2_5_vl", "eager", 1), ("qwen2_vl", "sdpa", 1), ("qwen2_vl", "eager", 1),
    ("qwen2_5_vl", "sdpa", 2),  # videos: two frame groups each
])
def test_identity_pyramid_matches_the_stock_model(kind, attn, frames):
    model = tiny_qwen_vl(kind, attn)
    batch = qwen_batch(labels=True, frames=frames)
    with torch.no_grad():
        vanilla = model(**batch)
        dpn.apply_pyramid(model, pyramid(experts=[[(1, 1)]] * 3))
        out = model(**batch)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], vanilla.logits[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, vanilla.loss, atol=1e-5, rtol=0)


def test_presets_keep_positions_and_renumbering_is_refused():
    model = tiny_qwen_vl()
    config = dpn.presets.paper(model)
    assert config.positions == "keep" and [s.layer for s in config.stages] == [1, 2, 4]
    assert all(s.experts == [(1, 1), (1, 2), (2, 2)] for s in config.stages)  # any stride runs on any grid
    with pytest.raises(ValueError, match="positions='renumber' is not available for qwen2_5_vl"):
        dpn.apply_pyramid(model, dpn.presets.paper(model, positions="renumber"))


@pytest.mark.parametrize("frames", [1, 2])
def test_forced_experts_give_the_documented_counts(frames):
    model = tiny_qwen_vl()
    dpn.apply_pyramid(model, pyramid())
    batch = qwen_batch(frames=frames)
    with torch.no_grad():
        out = model(**batch, force_experts=FORCED, output_hidden_states=True)
    for row, grids in enumerate(IMAGES):
        path = [MIXED[s][int(FORCED[row, s])] for s in range(3)] if grids else []
        per_grid = [grid_after((h // 2, w // 2), path) for h, w in grids for _ in range(frames)]  # each frame
        expected = [sum(c) for c in zip(*per_grid)] if grids else [0] * 4
        assert out.routing.visual_tokens[row].tolist() == expected
    # Sample 1's 5x7 grid pooled 1x2 keeps a last column of one-token windows: 5 x ceil(7 / 2) = 20.
    assert out.routing.visual_tokens[1, 1] == 20 * frames
    text = batch["attention_mask"].sum(1) - out.routing.visual_tokens[:, 0]
    assert out.logits.shape[1] == int((text + out.routing.visual_tokens[:, -1]).max())  # really shorter


def test_pooled_windows_keep_the_coordinates_of_their_first_token():
    model = tiny_qwen_vl()
    config = pyramid(experts=[[(2, 2)], [(1, 1)], [(1, 1)]])
    batch = qwen_batch(images=[[(8, 12)]])
    mask = batch["attention_mask"]
    stock, _ = model.model.get_rope_index(batch["input_ids"], (batch["input_ids"] == QWEN_IMAGE_TOKEN).int(),
                                          image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
    dpn.apply_pyramid(model, pyramid(experts=[[(1, 1)], [(1, 1)], [(1, 1)]]))
    with torch.no_grad():
        unpooled = model(**batch).position_ids
    assert torch.equal(unpooled[:, 0], stock[:, 0])  # every token kept: the stock coordinates
    dpn.remove_pyramid(model)
    dpn.apply_pyramid(model, config)
    with torch.no_grad():
        pooled = model(**batch).position_ids  # the final layout: after the one pooling stage
    image = (batch["input_ids"][0] == QWEN_IMAGE_TOKEN).nonzero().squeeze(1)
    grid = stock[:, 0, image].view(3, 4, 6)  # (t, h, w) coordinates of the 4x6 grid
    expected_image = grid[:, ::2, ::2].reshape(3, -1)  # each 2x2 window's top-left token
    text_before, text_after = stock[:, 0, : image[0]], stock[:, 0, image[-1] + 1:]
    assert torch.equal(pooled[:, 0], torch.cat([text_before, expected_image, text_after], dim=1))


@pytest.mark.parametrize("frames", [1, 2])
def test_cached_generation_matches_full_recompute(frames):
    model = tiny_qwen_vl(seed=3)
    dpn.apply_pyramid(model, pyramid())
    images = IMAGES[:2] + [[]]
    batch = qwen_batch(images=images, frames=frames)
    forced = FORCED[[0, 1, 3]]
    check_cached_generation_matches_recompute(model, batch, forced, [QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN], 6)


def test_an_identity_pyramid_generates_like_the_stock_model():
    """Decoding continues as in the stock model: from generate's positions, or (decoding by hand,
    without position_ids) from the rope delta the prefill left in the cache."""
    model = tiny_qwen_vl(seed=2)
    batch = qwen_batch()
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD_TOKEN_ID, bad_words_ids=NO_PLACEHOLDERS,
                   output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        stock = model.generate(**batch, **options)
        dpn.apply_pyramid(model, pyramid(experts=[[(1, 1)]] * 3))
        ours = model.generate(**batch, **options)
        # Decoding by hand, without position_ids: the cache's rope delta gives the same positions.
        prefill = model(**batch, use_cache=True, logits_to_keep=1)
        token = next_text_token(prefill.logits, [QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN])
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
        step = model(input_ids=token, attention_mask=mask, **cache_keyword(output_cache(prefill)))
    assert torch.equal(ours.sequences, stock.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(stock.logits), atol=1e-5, rtol=0)
    torch.testing.assert_close(step.logits[:, -1], stock.logits[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("frames", [1, 2])
def test_batched_matches_each_sample_alone(frames):
    model = tiny_qwen_vl(seed=4)
    dpn.apply_pyramid(model, pyramid())
    batch = qwen_batch(frames=frames)
    pixels, grid = ("pixel_values_videos", "video_grid_thw") if frames > 1 else ("pixel_values", "image_grid_thw")
    with torch.no_grad():
        together = model(**batch, force_experts=FORCED)
        first_patch = 0
        for row, grids in enumerate(IMAGES):
            valid = batch["attention_mask"][row].bool()
            alone = {key: batch[key][row:row + 1, valid] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
            patches = sum(frames * h * w for h, w in grids)
            if grids:
                alone[pixels] = batch[pixels][first_patch:first_patch + patches]
                alone[grid] = torch.tensor([[frames, h, w] for h, w in grids])
            first_patch += patches
            out = model(**alone, force_experts=FORCED[row:row + 1])
            valid = together.attention_mask[row].bool()
            torch.testing.assert_close(together.logits[row][valid], out.logits[0], atol=1e-4, rtol=0)
            assert together.routing.visual_tokens[row].tolist() == out.routing.visual_tokens[0].tolist()
    # The routing really differed per sample: the first two samples kept different counts after stage 0.
    assert together.routing.visual_tokens[0, 1] != together.routing.visual_tokens[1, 1]


def test_flops_match_the_flop_counter():
    model = tiny_qwen_vl(attn="eager")  # the CPU sdpa kernel is not in the FLOP counter's registry
    dpn.apply_pyramid(model, pyramid())
    batch = qwen_batch(images=[[(10, 14)]])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(**batch, force_experts=[[1, 2, 2]])
    layers = re.compile(r"language_model\.layers\.\d+$")
    measured = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if layers.search(name))
    assert out.routing.flops[0].item() == pytest.approx(measured, rel=0.02)
    assert out.routing.flops_ratio[0] < 1


def test_save_and_load_reproduce_the_outputs(tmp_path):
    model = tiny_qwen_vl()
    dpn.apply_pyramid(model, dpn.presets.paper(model, min_tokens_to_pool=4))
    with torch.no_grad():
        for parameter in dpn.get_pyramid(model).parameters():
            parameter.add_(torch.randn_like(parameter))
    batch = qwen_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    dpn.save_pyramid(model, tmp_path)
    reloaded = dpn.load_pyramid(tiny_qwen_vl(), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)


STRATEGIES = ["paper", "static:2x2", "random", "projector:2x2", "fastv:0.5", "pdrop:0.5", "dart:0.5", "select:0.2",
              "mixed:0.2"]
# Mixed experts forced to pool 2x2, keep 0.25 and pool 1x2 (the fourth sample has no image).
MIXED_FORCED = torch.tensor([[3], [4], [1], [-1]])


@pytest.mark.parametrize("spec", STRATEGIES)
def test_every_strategy_trains_and_generates_with_the_cache(spec):
    model = tiny_qwen_vl(seed=5)
    config = dpn.presets.from_spec(spec, model)
    dpn.apply_pyramid(model, config)
    batch = qwen_batch(labels=True)
    forced = None
    if spec == "random":  # one fixed draw for both runs
        forced = FORCED
    elif spec.startswith("mixed"):  # pooled and selected samples side by side
        forced = MIXED_FORCED
    out = check_training_and_cached_generation(model, batch, forced, [QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN])
    if spec.startswith(("fastv", "pdrop", "dart")):
        grids = [g for grids in IMAGES for g in grids]
        assert out.routing.visual_tokens[0, 1] == kept_count(grids[0][0] * grids[0][1] // 4, 0.5)
