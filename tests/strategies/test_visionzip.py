"""VisionZip (dominant + contextual tokens before the LLM): its rule on a hand-worked example, the
keys against the tower's own projections, the rows the LLM receives, FLOPs, cached generation in
both position modes, and clear errors. The peer contract runs in test_peers.py."""

from __future__ import annotations

import pytest
import torch

import dpn
from dpn.strategies.selection import kept_count
from dpn.strategies.visionzip import (
    VISIONZIP_CONTEXTUAL_SHARE, VISIONZIP_KEEP_RATIO, dominant_and_contextual, token_budget,
)
from dpn.vision_cues import class_token_cues, feature_layer_index
from helpers import (
    GRID, IMAGE_TOKEN_ID, batch_of, check_selection_flops_match_counter,
    first_layer_input, make_prompt, pixels, tiny_llava, tiny_qwen_vl,
)

VISUAL = GRID[0] * GRID[1]
KEEP = 0.3


def test_dominant_patches_then_members_merged_into_their_most_similar_target():
    attention = torch.tensor([0.05, 0.5, 0.05, 0.05, 0.3, 0.05])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [1.0, 1.0], [-1.0, 0.2]])
    features = torch.arange(6, dtype=torch.float32).unsqueeze(1) * torch.tensor([[1.0, 10.0]])
    # Dominant: patches 1 and 4. Remaining 0, 2, 3, 5; two contextual tokens: step 2, targets 0 and 3.
    # Patch 2 (0.9, 0.1) joins target 0 (1, 0); patch 5 (-1, 0.2) is closer to 3 (0.1, 0.9) than to 0.
    dominant, targets, merged = dominant_and_contextual(attention, keys, features, dominant=2, contextual=2)
    assert dominant.tolist() == [1, 4] and targets.tolist() == [0, 3]
    torch.testing.assert_close(merged, torch.stack([features[0] + features[2], features[3] + features[5]]))
    # A target nobody joins stays itself; with no contextual budget only the dominant patches remain.
    _, targets, merged = dominant_and_contextual(attention, keys, features, dominant=2, contextual=4)
    assert targets.tolist() == [0, 2, 3, 5]
    torch.testing.assert_close(merged, features[[0, 2, 3, 5]])
    dominant, targets, merged = dominant_and_contextual(attention, keys, features, dominant=2, contextual=0)
    assert dominant.tolist() == [1, 4] and targets.numel() == 0 and merged.shape == (0, 2)


def test_the_budget_splits_as_the_references_readme():
    assert token_budget(576, VISIONZIP_KEEP_RATIO, VISIONZIP_CONTEXTUAL_SHARE) == (54, 10)
    assert token_budget(576, 128 / 576, VISIONZIP_CONTEXTUAL_SHARE) == (108, 20)
    assert token_budget(576, 192 / 576, VISIONZIP_CONTEXTUAL_SHARE) == (162, 30)
    assert token_budget(4, 0.1, 0.5) == (2, 0)  # the class token and one patch at least


def test_the_keys_are_the_feature_layers_head_mean_keys():
    model = tiny_llava(seed=3)
    tower = model.model.vision_tower
    with torch.no_grad():
        states = tower(pixels(2), output_hidden_states=True).hidden_states
        layer = tower.encoder.layers[feature_layer_index(model.config.vision_feature_layer, len(tower.encoder.layers))]
        cues = class_token_cues(layer, states[0], states[1], model.model.multi_modal_projector)
        heads = layer.self_attn.num_heads
        keys = layer.self_attn.k_proj(layer.layer_norm1(states[0]))  # (images, tokens, heads * head_dim)
    expected = keys.view(*keys.shape[:2], heads, -1).mean(2)[:, 1:]
    torch.testing.assert_close(cues.keys, expected, atol=1e-5, rtol=1e-5)


def test_the_llm_receives_the_class_token_dominant_and_contextual_rows():
    model = tiny_llava(seed=1)
    config = dpn.presets.from_spec("visionzip", model.config)
    assert (config.stages[0].keep_ratio, config.strategy.contextual_share, config.positions) == (
        VISIONZIP_KEEP_RATIO, VISIONZIP_CONTEXTUAL_SHARE, "renumber")
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    with torch.no_grad():
        states = tower(pixels(1), output_hidden_states=True).hidden_states
        cues = class_token_cues(tower.encoder.layers[0], states[0], states[1], projector)
        dominant_count, contextual_count = token_budget(VISUAL, KEEP, VISIONZIP_CONTEXTUAL_SHARE)
        dominant, _, merged = dominant_and_contextual(cues.attention[0], cues.keys[0], cues.features[0],
                                                      dominant_count - 1, contextual_count)
        expected = projector(torch.cat([cues.class_feature, cues.features[0][dominant], merged]))
    dpn.apply_pyramid(model, dpn.presets.from_spec(f"visionzip:{KEEP}", model.config))
    batch = batch_of([make_prompt(3, 4, seed=1)])
    received, out = first_layer_input(model, {**batch, "pixel_values": pixels(1)})
    start = int((batch["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0])
    total = dominant_count + contextual_count
    torch.testing.assert_close(received[0, start:start + total], expected)
    assert out.routing.visual_tokens[0].tolist() == [VISUAL, total] and total == kept_count(VISUAL, KEEP)


def test_flops_match_the_flop_counter():
    check_selection_flops_match_counter(lambda model: dpn.presets.from_spec(f"visionzip:{KEEP}", model.config), KEEP)




def test_families_without_a_class_token_and_bad_shares_are_clear_errors():
    qwen = tiny_qwen_vl(seed=0)
    with pytest.raises(ValueError, match="visionzip ranks patches by the vision tower's class-token attention"):
        dpn.apply_pyramid(qwen, dpn.PyramidConfig(stages=[dpn.SelectionStage(-1, keep_ratio=0.3)],
                                                  strategy=dpn.VisionZipConfig(), positions="keep"))
    with pytest.raises(ValueError, match="visionzip prunes once, before the LLM"):
        dpn.PyramidConfig(stages=[dpn.SelectionStage(2, keep_ratio=0.5)], strategy=dpn.VisionZipConfig())
    for bad in (-0.1, 1.0, "some", None):
        with pytest.raises(ValueError, match="contextual_share must be a number in"):
            dpn.VisionZipConfig(contextual_share=bad)
