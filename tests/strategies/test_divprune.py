"""DivPrune (max-min diversity before the LLM): its rule on a hand-worked example, its defaults, its
FLOPs and cached generation with both position modes. The contract every peer meets (kept counts,
batched == alone, cached == recomputed, a training step) runs for it in test_peers.py."""

from __future__ import annotations


import pytest
import torch

import dpn
from dpn.strategies.divprune import DIVPRUNE_KEEP_RATIO, max_min_diverse
from dpn.strategies.selection import kept_count
from helpers import check_selection_flops_match_counter, first_layer_input, GRID, IMAGE_TOKEN_ID, batch_of, make_prompt, pixels, \
    tiny_llava

VISUAL = GRID[0] * GRID[1]
KEEP = 0.3


def test_the_most_isolated_token_comes_first_then_the_farthest_from_those_kept():
    # Unit directions at angles (degrees): 0, 10, 20 form a cluster; 90 and 100 another; 180 stands alone.
    angles = torch.tensor([0.0, 10.0, 20.0, 90.0, 100.0, 180.0]) * torch.pi / 180
    tokens = torch.stack([angles.cos(), angles.sin()], 1) * torch.tensor([[1.0], [2], [3], [4], [5], [6]])  # scale
    # 180 is farthest from its nearest neighbour (80 degrees to 100); then 0 (180 degrees from it);
    # then 90 (90 from 0, 90 from 180); then 20 (70 from 90) vs 10 (80 from 90, 10 from 0): 20 (20 from 0).
    assert max_min_diverse(tokens, 1).tolist() == [5]
    assert max_min_diverse(tokens, 2).tolist() == [0, 5]
    assert max_min_diverse(tokens, 3).tolist() == [0, 3, 5]
    assert max_min_diverse(tokens, 4).tolist() == [0, 2, 3, 5]
    assert max_min_diverse(tokens, 9).tolist() == [0, 1, 2, 3, 4, 5]  # never more than there are


def test_spec_preset_and_the_kept_rows_follow_the_rule():
    model = tiny_llava(seed=1)
    config = dpn.presets.from_spec("divprune", model.config)
    assert (config.stages[0].layer, config.stages[0].keep_ratio, config.positions) == (-1, DIVPRUNE_KEEP_RATIO,
                                                                                       "renumber")
    dpn.apply_pyramid(model, dpn.presets.from_spec(f"divprune:{KEEP}", model.config))
    batch = batch_of([make_prompt(3, 4, seed=1)])
    with torch.no_grad():
        features = model.model.get_image_features(pixels(1))
    received, out = first_layer_input(model, {**batch, "pixel_values": pixels(1)})
    features = getattr(features, "pooler_output", features)  # the image's projected rows, as the LLM receives them
    image = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features.reshape(VISUAL, -1)
    kept = max_min_diverse(image, kept_count(VISUAL, KEEP))
    start = int((batch["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0])
    layer_input = received[0]  # what layer 0 received: the text, then the kept image rows
    torch.testing.assert_close(layer_input[start:start + kept.shape[0]], image[kept])
    assert out.routing.visual_tokens[0].tolist() == [VISUAL, kept_count(VISUAL, KEEP)]


def test_flops_match_the_flop_counter():
    check_selection_flops_match_counter(lambda model: dpn.presets.from_spec(f"divprune:{KEEP}", model.config), KEEP)




def test_a_stage_elsewhere_than_before_the_llm_is_a_clear_error():
    with pytest.raises(ValueError, match="divprune prunes once, before the LLM"):
        dpn.PyramidConfig(stages=[dpn.SelectionStage(1, keep_ratio=0.5)], strategy=dpn.DivPruneConfig())
    with pytest.raises(ValueError, match="pyramid spec 'divprune:2'"):
        dpn.presets.from_spec("divprune:2", tiny_llava().config)
