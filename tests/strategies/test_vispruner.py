"""VisPruner (class-token attention + duplicate removal before the LLM): its rule on a hand-worked
example, the cues against the tower's own eager attention, the kept rows, FLOPs, cached generation
in both position modes, and clear errors where a family has no class token. The contract every peer
meets (kept counts, batched == alone, cached == recomputed, a training step) runs in test_peers.py."""

from __future__ import annotations

import pytest
import torch

import dpn
from dpn.strategies.selection import kept_count
from dpn.strategies.vispruner import VISPRUNER_IMPORTANT_RATIO, VISPRUNER_KEEP_RATIO, important_and_diverse
from dpn.vision_cues import class_token_cues, feature_layer_index
from helpers import (
    GRID, IMAGE_TOKEN_ID, batch_of, check_selection_flops_match_counter,
    first_layer_input, make_prompt, pixels, tiny_llava, tiny_qwen_vl,
)

VISUAL = GRID[0] * GRID[1]
KEEP = 0.3


def directions(degrees: list[float]) -> torch.Tensor:
    angles = torch.tensor(degrees) * torch.pi / 180
    return torch.stack([angles.cos(), angles.sin()], 1) * torch.arange(1, len(degrees) + 1).unsqueeze(1)  # any length


def test_the_most_attended_tokens_then_the_least_duplicated_of_the_rest():
    importance = torch.tensor([0.9, 0.5, 0.4, 0.3, 0.2, 0.1])  # already in descending order
    features = directions([45, 0, 5, 90, 92, 180])
    # One important token (0); the residual 1..5 splits into even places 1, 3, 5 and odd places 2, 4.
    # Highest cosine to an odd-place token: 1 -> 2 (5 degrees), 3 -> 4 (2 degrees), 5 -> 4 (88 degrees).
    # Two must go (5 residual tokens, 3 wanted): 3 and 1, the most duplicated; 5, 2 and 4 stay.
    assert important_and_diverse(importance, features, keep=4, important_ratio=0.25).tolist() == [0, 2, 4, 5]
    # No important tokens: 0..5 splits into 0, 2, 4 and 1, 3, 5; 4 (2 degrees from 3) and 2 (5 from 1) go.
    assert important_and_diverse(importance, features, keep=4, important_ratio=0.0).tolist() == [0, 1, 3, 5]
    # Only important tokens: the four most attended.
    assert important_and_diverse(importance, features, keep=4, important_ratio=1.0).tolist() == [0, 1, 2, 3]
    assert important_and_diverse(importance, features, keep=9, important_ratio=0.5).tolist() == list(range(6))


def test_an_odd_residual_list_drops_at_most_its_even_places():
    importance = torch.linspace(1, 0, 12)
    features = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    kept = important_and_diverse(importance, features, keep=2, important_ratio=0.5)  # 11 residual, 1 wanted
    assert kept.shape == (2,) and kept[0] == 0 and len(set(kept.tolist())) == 2


def test_the_cues_are_the_towers_class_token_attention_and_feature_layer():
    model = tiny_llava(attn="eager", seed=3)
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(pixels(2), output_attentions=True, output_hidden_states=True)
        layer = feature_layer_index(model.config.vision_feature_layer, len(tower.encoder.layers))
        cues = class_token_cues(tower.encoder.layers[layer], out.hidden_states[layer], out.hidden_states[layer + 1],
                                model.model.multi_modal_projector)
    # The reference reads attentions[-2][:, :, 0, 1:] (the feature layer's class-token row), head-averaged.
    torch.testing.assert_close(cues.attention, out.attentions[layer][:, :, 0, 1:].mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cues.features, out.hidden_states[-2][:, 1:])  # what LLaVA projects ('default')
    torch.testing.assert_close(cues.class_feature, out.hidden_states[-2][:, 0])
    assert layer == 0 and feature_layer_index(-1, 2) == 1 and feature_layer_index(2, 2) == 1
    with pytest.raises(ValueError, match="not the output of one of the tower's 2 encoder layers"):
        feature_layer_index(-3, 2)


def test_spec_preset_and_the_kept_rows_follow_the_rule():
    model = tiny_llava(seed=1)
    config = dpn.presets.from_spec("vispruner", model.config)
    assert (config.stages[0].layer, config.stages[0].keep_ratio, config.strategy.important_ratio,
            config.positions) == (-1, VISPRUNER_KEEP_RATIO, VISPRUNER_IMPORTANT_RATIO, "renumber")
    assert kept_count(576, VISPRUNER_KEEP_RATIO) == 128  # the reference's README budget on LLaVA-1.5
    tower = model.model.vision_tower
    with torch.no_grad():
        states = tower(pixels(1), output_hidden_states=True).hidden_states
        layer = feature_layer_index(model.config.vision_feature_layer, len(tower.encoder.layers))
        importance = class_token_cues(tower.encoder.layers[layer], states[layer], states[layer + 1],
                                      model.model.multi_modal_projector).attention[0]
        projected = model.model.multi_modal_projector(states[layer + 1][0, 1:])
    kept = important_and_diverse(importance, states[layer + 1][0, 1:], kept_count(VISUAL, KEEP),
                                 VISPRUNER_IMPORTANT_RATIO)
    dpn.apply_pyramid(model, dpn.presets.from_spec(f"vispruner:{KEEP}", model.config))
    batch = batch_of([make_prompt(3, 4, seed=1)])
    received, out = first_layer_input(model, {**batch, "pixel_values": pixels(1)})
    start = int((batch["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0])
    torch.testing.assert_close(received[0, start:start + kept.shape[0]], projected[kept])
    assert out.routing.visual_tokens[0].tolist() == [VISUAL, kept_count(VISUAL, KEEP)]


def test_flops_match_the_flop_counter():
    check_selection_flops_match_counter(lambda model: dpn.presets.from_spec(f"vispruner:{KEEP}", model.config), KEEP)




def test_families_and_inputs_without_cues_are_clear_errors():
    qwen = tiny_qwen_vl(seed=0)
    with pytest.raises(ValueError, match="vispruner ranks patches by the vision tower's class-token attention"):
        dpn.apply_pyramid(qwen, dpn.presets.from_spec("vispruner", qwen.config))
    model = tiny_llava(seed=1)
    model.config.vision_feature_layer = [-2, -1]  # two feature layers concatenated: no one layer to read
    with pytest.raises(ValueError, match="vispruner ranks patches"):
        dpn.apply_pyramid(model, dpn.presets.from_spec("vispruner", model.config))
    model = tiny_llava(seed=1)
    dpn.apply_pyramid(model, dpn.presets.from_spec("vispruner", model.config))
    assert "mm_encoder_outputs" not in model.forward.__signature__.parameters  # generate() passes the pixels
    encoded = {"image": model.model.get_image_features(pixels(1), return_dict=True)}
    with pytest.raises(ValueError, match="needs pixel_values, not mm_encoder_outputs"):
        model(**batch_of([make_prompt(3, 4)]), mm_encoder_outputs=encoded)
    with pytest.raises(ValueError, match="vispruner prunes once, before the LLM"):
        dpn.PyramidConfig(stages=[dpn.SelectionStage(1, keep_ratio=0.5)], strategy=dpn.VisPrunerConfig())
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="important_ratio must be a number in"):
            dpn.VisPrunerConfig(important_ratio=bad)
