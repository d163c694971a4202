"""LLaVA-NeXT and LLaVA-OneVision: the invariants on tiny random models, with images of different sizes
(so different high-resolution grids) in one batch, left padding, a text-only sample, a two-image
sample, and OneVision videos. Feature lengths come from the stock model, as a processor's would."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import dpn
from dpn.models import get_adapter
from dpn.strategies.selection import kept_count
from helpers import (
    ANYRES_PINPOINTS, IMAGE_TOKEN_ID, NEXT_TILE, PAD_TOKEN_ID, VOCAB, batch_of, check_cached_generation_matches_recompute,
    check_training_and_cached_generation, tiny_llava_next,
)

VIDEO_TOKEN_ID = 6
KINDS = ["llava_next", "llava_onevision"]
# Image sizes (height, width) per sample: different aspect ratios give different high-resolution
# grids; the third sample has two images; the fourth is text only.
IMAGES = [[(20, 30)], [(32, 12)], [(16, 16), (30, 20)], []]
STAGES = (1, 2, 4)
# Generated tokens must stay text: a random model could emit a placeholder id, which a recomputed
# prefill would read as one more image token.
NO_PLACEHOLDERS = [[IMAGE_TOKEN_ID], [VIDEO_TOKEN_ID]]
MIXED = [[(1, 1), (1, 2), (2, 2)]] * 3
FORCED = torch.tensor([[2, 1, 0], [1, 2, 1], [0, 2, 2], [-1, -1, -1]])


def next_batch(model, images=IMAGES, seed: int = 0, labels: bool = False, frames: int = 0):
    """Prompts whose placeholder runs have the stock model's feature lengths; ``frames``: videos instead."""
    g = torch.Generator().manual_seed(seed)
    sizes = [size for sample in images for size in sample]
    inputs = {}
    if frames:
        videos = torch.randn(len(sizes), frames, 3, NEXT_TILE, NEXT_TILE, generator=g)
        lengths = [f.shape[0] for f in model.model.get_video_features(videos, return_dict=True).pooler_output]
        inputs["pixel_values_videos"] = videos
        token = VIDEO_TOKEN_ID
    elif sizes:
        patches = [image_size_to_num_patches(list(s), ANYRES_PINPOINTS, NEXT_TILE) for s in sizes]
        inputs["pixel_values"] = torch.randn(len(sizes), max(patches), 3, NEXT_TILE, NEXT_TILE, generator=g)
        inputs["image_sizes"] = torch.tensor(sizes)
        if model.config.model_type == "llava_onevision":  # samples with several images are not tiled
            inputs["batch_num_images"] = torch.tensor([len(sample) for sample in images if sample])
        features = model.model.get_image_features(**inputs, return_dict=True).pooler_output
        lengths = [f.shape[0] for f in features]
        token = IMAGE_TOKEN_ID
    prompts, item = [], 0
    for index, sample in enumerate(images):
        ids = torch.randint(10, VOCAB, (2 + index,), generator=g).tolist()
        for _ in sample:
            ids += [token] * lengths[item] + torch.randint(10, VOCAB, (2,), generator=g).tolist()
            item += 1
        prompts.append(ids + torch.randint(10, VOCAB, (3,), generator=g).tolist())
    batch = {**batch_of(prompts), **inputs}
    if labels:
        ids = batch["input_ids"]
        batch["labels"] = ids.masked_fill((batch["attention_mask"] == 0) | (ids == token), -100)
    return batch


def pyramid(experts=MIXED, **kwargs) -> dpn.PyramidConfig:
    stages = [dpn.PoolingStage(layer, list(e)) for layer, e in zip(STAGES, experts)]
    return dpn.PyramidConfig(stages=stages, strategy=dpn.DPNConfig(min_tokens_to_pool=4), **kwargs)


def visual(batch) -> dict:
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_identity_pyramid_matches_the_stock_model(kind, attn):
    model = tiny_llava_next(kind, attn)
    batch = next_batch(model, labels=True)
    with torch.no_grad():
        vanilla = model(**batch)
        dpn.apply_pyramid(model, pyramid(experts=[[(1, 1)]] * 3))
        out = model(**batch)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], vanilla.logits[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, vanilla.loss, atol=1e-5, rtol=0)


def layouts(model, images=IMAGES) -> list[list]:
    """Per sample, the grids (rows, cols, newline) of its images, as the adapter reads them."""
    sizes = torch.tensor([s for sample in images for s in sample])
    numbers = torch.tensor([len(sample) for sample in images if sample])
    flat = get_adapter(model).image_layouts(model.config, sizes, numbers, None)
    out, item = [], 0
    for sample in images:
        grids = []
        for _ in sample:
            grids += [part for part in flat[item] if hasattr(part, "rows")]
            item += 1
        out.append(grids)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_forced_experts_give_the_documented_counts_and_one_newline_per_row(kind):
    model = tiny_llava_next(kind)
    dpn.apply_pyramid(model, pyramid())
    batch = next_batch(model)
    with torch.no_grad():
        out = model(**batch, force_experts=FORCED, output_hidden_states=True)
    text = batch["attention_mask"].sum(1)
    for row, grids in enumerate(layouts(model)):
        path = [MIXED[s][int(FORCED[row, s])] for s in range(3)] if grids else []
        shapes = [(g.rows, g.cols) for g in grids]
        expected_visual, expected_newlines = [sum(g.rows * g.cols for g in grids)], [sum(g.rows for g in grids if g.newline)]
        for kh, kw in path:
            shapes = [(math.ceil(r / kh), math.ceil(c / kw)) if r * c >= 4 else (r, c) for r, c in shapes]
            expected_visual.append(sum(r * c for r, c in shapes))
            expected_newlines.append(sum(r for (r, _), g in zip(shapes, grids) if g.newline))
        if not grids:
            expected_visual, expected_newlines = [0] * 4, [0] * 4
        assert out.routing.visual_tokens[row].tolist() == expected_visual
        # The sequence after each stage: the text, the visual tokens, one newline per (pooled) high-resolution row.
        first_text = int(text[row]) - expected_visual[0] - expected_newlines[0]
        segment_tokens = [first_text + v + n for v, n in zip(expected_visual, expected_newlines)]
        layer_tokens = out.routing.layer_tokens[row].tolist()
        assert [layer_tokens[0], layer_tokens[2], layer_tokens[3], layer_tokens[5]] == segment_tokens
    assert any(g.newline for grids in layouts(model) for g in grids)  # the batch does exercise newline grids


def test_pooled_rows_keep_the_newline_of_the_last_row_they_cover(monkeypatch):
    from dpn.runtime.segments import SegmentRunner

    model = tiny_llava_next("llava_next")
    dpn.apply_pyramid(model, pyramid(experts=[[(2, 2)], [(1, 1)], [(1, 1)]]))
    batch = next_batch(model, images=[[(20, 30)]])
    runs = []
    original = SegmentRunner.run

    def spy(self, segment, bounds, layout, reshaped):
        result = original(self, segment, bounds, layout, reshaped)
        runs.append((layout, result.layout))
        return result

    monkeypatch.setattr(SegmentRunner, "run", spy)
    with torch.no_grad():
        model(**batch)
    (_, before), (after, _) = runs[0], runs[1]  # segment 0's output, and segment 1's input (after stage 0)
    old = next(k for k in range(len(before.spans)) if before.spans.newline[k])
    new = next(k for k in range(len(after.spans)) if after.spans.newline[k])
    rows, cols = before.spans.rows[old], before.spans.cols[old]
    assert (after.spans.rows[new], after.spans.cols[new]) == (math.ceil(rows / 2), math.ceil(cols / 2))
    length = before.hidden.shape[1]
    for i in range(after.spans.rows[new]):
        source = before.spans.newline_index(old, min(2 * (i + 1), rows) - 1, length)
        target = after.spans.newline_index(new, i, after.hidden.shape[1])
        torch.testing.assert_close(after.hidden.flatten(0, 1)[target], before.hidden.flatten(0, 1)[source], atol=0,
                                   rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_matches_full_recompute(kind):
    model = tiny_llava_next(kind, seed=3)
    dpn.apply_pyramid(model, pyramid())
    batch = next_batch(model)
    check_cached_generation_matches_recompute(model, batch, FORCED, [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID], 5)


VIDEOS = [[(16, 16)], [(16, 16), (16, 16)], []]  # the second sample has two videos


@pytest.mark.parametrize("kind, frames", [("llava_next", 0), ("llava_onevision", 0), ("llava_onevision", 3)])
def test_batched_matches_each_sample_alone(kind, frames):
    model = tiny_llava_next(kind, seed=4)
    dpn.apply_pyramid(model, pyramid())
    samples, forced = (VIDEOS, FORCED[[0, 1, 3]]) if frames else (IMAGES, FORCED)
    batch = next_batch(model, images=samples, frames=frames)
    with torch.no_grad():
        together = model(**batch, force_experts=forced)
        first = 0
        for row, sample in enumerate(samples):
            valid = batch["attention_mask"][row].bool()
            alone = {key: batch[key][row:row + 1, valid] for key in ("input_ids", "attention_mask")}
            if sample and frames:
                alone["pixel_values_videos"] = batch["pixel_values_videos"][first:first + len(sample)]
            elif sample:
                alone["pixel_values"] = batch["pixel_values"][first:first + len(sample)]
                alone["image_sizes"] = batch["image_sizes"][first:first + len(sample)]
                if "batch_num_images" in batch:
                    alone["batch_num_images"] = torch.tensor([len(sample)])
            first += len(sample)
            out = model(**alone, force_experts=forced[row:row + 1])
            torch.testing.assert_close(together.logits[row][together.attention_mask[row].bool()], out.logits[0],
                                       atol=1e-4, rtol=0)
            assert together.routing.visual_tokens[row].tolist() == out.routing.visual_tokens[0].tolist()
    # The routing really differed per sample: the first two samples kept different counts after stage 0.
    per_item = together.routing.visual_tokens[:2, 1] / torch.tensor([len(samples[0]), len(samples[1])])
    assert per_item[0] != per_item[1]


def test_onevision_videos_pool_each_frame_and_keep_the_newline():
    model = tiny_llava_next("llava_onevision", seed=6)
    batch = next_batch(model, images=[[(16, 16)], [(16, 16)], []], frames=3)
    with torch.no_grad():
        vanilla = model(**batch).logits
        dpn.apply_pyramid(model, pyramid(experts=[[(1, 1)]] * 3))
        identity = model(**batch)
        dpn.remove_pyramid(model)
        dpn.apply_pyramid(model, pyramid())
        pooled = model(**batch, force_experts=FORCED[[0, 1, 3]])
        generated = model.generate(**batch, force_experts=FORCED[[0, 1, 3]], max_new_tokens=3, do_sample=False,
                                   pad_token_id=PAD_TOKEN_ID, bad_words_ids=NO_PLACEHOLDERS, output_logits=True,
                                   return_dict_in_generate=True)
        ids = generated.sequences[:, :-1]
        mask = torch.cat([batch["attention_mask"], torch.ones_like(ids[:, batch["input_ids"].shape[1]:])], 1)
        labels = torch.full_like(ids, -100)
        labels[:, batch["input_ids"].shape[1]:] = ids[:, batch["input_ids"].shape[1]:]
        recomputed = model(input_ids=ids, attention_mask=mask, labels=labels, force_experts=FORCED[[0, 1, 3]],
                           **visual(batch))
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(identity.logits[valid], vanilla[valid], atol=1e-5, rtol=0)
    # 3 frames of a 2x2 grid each (4x4 patches pooled 2x2 by the model): 12 visual tokens + 1 newline.
    assert identity.routing.visual_tokens[:, 0].tolist() == [12, 12, 0]
    # Sample 0 takes 2x2 at stage 0: every frame 2x2 -> 1x1.
    assert pooled.routing.visual_tokens[0, 1] == 3 and pooled.routing.visual_tokens[1, 1] == 6
    torch.testing.assert_close(recomputed.logits[:, -1], generated.logits[-1], atol=1e-4, rtol=0)


def test_flops_match_the_flop_counter():
    model = tiny_llava_next("llava_next", attn="eager")
    dpn.apply_pyramid(model, pyramid())
    batch = next_batch(model, images=[[(20, 30)]])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(**batch, force_experts=[[1, 2, 2]])
    layers = re.compile(r"language_model\.layers\.\d+$")
    measured = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if layers.search(name))
    assert out.routing.flops[0].item() == pytest.approx(measured, rel=0.02)
    assert out.routing.flops_ratio[0] < 1
    # dpn flops counts the same path from the config and the image's layout, newlines included.
    (layout,) = get_adapter(model).image_layouts(model.config, batch["image_sizes"], None, None)
    text = int(batch["attention_mask"].sum()) - sum(part.tokens for part in layout)
    paths = {tuple(p["experts"]): p for p in dpn.flops.path_flops(model, dpn.get_pyramid_config(model), text, layout)}
    assert paths[("1x2", "2x2", "2x2")]["ratio"] == pytest.approx(out.routing.flops_ratio[0].item())


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_reproduce_the_outputs(kind, tmp_path):
    model = tiny_llava_next(kind)
    dpn.apply_pyramid(model, dpn.presets.paper(model, min_tokens_to_pool=4))
    with torch.no_grad():
        for parameter in dpn.get_pyramid(model).parameters():
            parameter.add_(torch.randn_like(parameter))
    batch = next_batch(model)
    with torch.no_grad():
        expected = model(**batch).logits
    dpn.save_pyramid(model, tmp_path)
    reloaded = dpn.load_pyramid(tiny_llava_next(kind), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)


STRATEGIES = ["paper", "static:2x2", "random", "projector:2x2", "fastv:0.5", "pdrop:0.5", "dart:0.5", "select:0.2",
              "mixed:0.2"]
# Mixed experts forced to pool 2x2, keep 0.25 and pool 1x2 (the fourth sample has no image).
MIXED_FORCED = torch.tensor([[3], [4], [1], [-1]])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", STRATEGIES)
def test_every_strategy_trains_and_generates_with_the_cache(kind, spec):
    model = tiny_llava_next(kind, seed=5)
    dpn.apply_pyramid(model, dpn.presets.from_spec(spec, model))
    batch = next_batch(model, labels=True)
    # random: one fixed draw for both runs; mixed: pooled and selected samples side by side
    forced = {"random": FORCED, "mixed:0.2": MIXED_FORCED}.get(spec)
    out = check_training_and_cached_generation(model, batch, forced, [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID])
    if spec.startswith(("fastv", "pdrop", "dart")):  # each grid keeps half its tokens (base grid 4x4 first)
        first = layouts(model)[0]
        assert out.routing.visual_tokens[0, 1] == sum(kept_count(g.rows * g.cols, 0.5) for g in first)
