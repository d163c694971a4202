"""DART (duplication-aware token reduction): its defaults, its rule on a hand-worked example, its
FLOPs, and cached generation in both position modes. The contract every peer meets (kept counts,
batched == alone, cached == recomputed, a training step) runs for it in test_peers.py."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import dpn
from dpn.spans import find_visual_spans
from dpn.strategies import DARTConfig, StageInput
from dpn.strategies.dart import DuplicationAwareSelection
from helpers import check_selection_flops_match_counter, GRID, batch_of, make_prompt, pixels, tiny_llava

VISUAL = GRID[0] * GRID[1]
KEEP = 0.3


def dart(model, **overrides) -> dpn.PyramidConfig:
    return dpn.presets.build(dpn.strategies.dart.preset(dpn.geometry_of(model), keep_ratio=KEEP), **overrides)


def test_spec_and_preset_follow_the_reference_defaults():
    model = tiny_llava()
    config = dpn.presets.from_spec("dart", model)
    assert config.strategy == DARTConfig(image_pivots=4, text_pivots=4, pivot_norm="l1")
    assert [(s.layer, s.keep_ratio) for s in config.stages] == [(1, pytest.approx(128 / 576))]  # K = 2
    assert config.positions == "keep"  # kept tokens keep their positions, as in the reference
    assert dpn.presets.from_spec("dart:0.25", model).stages[0].keep_ratio == 0.25


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generation_with_renumbered_positions_matches_full_recompute(attn):
    positions = "renumber"  # the preset keeps positions (test_peers.py); renumbering must hold too
    model = tiny_llava(seed=3, attn=attn)
    dpn.apply_pyramid(model, dart(model, positions=positions))
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(7, 2, seed=2)])
    images = pixels(2)
    new_tokens = 6
    with torch.no_grad():
        generated = model.generate(**batch, pixel_values=images, max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompt_length = ids.shape[1]
    for step in range(new_tokens):
        labels = torch.full_like(ids, -100)
        labels[:, prompt_length:] = ids[:, prompt_length:]  # the query (and text pivots) stay in the prompt
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=images, labels=labels, use_cache=False)
        torch.testing.assert_close(out.logits[:, -1], generated.logits[step], atol=1e-4, rtol=0)
        ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(ids, generated.sequences)


def test_flops_match_the_flop_counter():
    check_selection_flops_match_counter(lambda model: dart(model), KEEP)


class _KeysAreInputs(nn.Module):
    """A stand-in decoder layer whose keys are its input (no norm, identity projection): pivot
    scores are then the L1 norms of the layer input, set by hand below."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.input_layernorm = nn.Identity()
        self.self_attn = nn.Module()
        self.self_attn.k_proj = nn.Identity()
        self.self_attn.head_dim = width


def test_kept_tokens_equal_a_hand_computed_example():
    # One sample: text at 0-1, an 8-token image (2x4) at 2-9, text at 10-11 (11 is the query).
    length, width = 12, 2
    layer_input = torch.zeros(1, length, width)
    layer_input[0, 2:10] = torch.tensor([[1.0, 0]] * 8)
    layer_input[0, 5] = torch.tensor([3.0, 0])  # the image token with the largest key norm: the image pivot
    layer_input[0, 10] = torch.tensor([2.0, 2.0])  # the text token with the largest key norm: the text pivot
    layer_input[0, 11] = torch.tensor([0.5, 0])
    hidden = torch.zeros(1, length, width)
    directions = {2: (1, 0), 3: (0, 1), 4: (-1, 0), 5: (1, 0), 6: (0.9, 0.1), 7: (0, -1), 8: (-0.7, 0.7),
                  9: (1, 0.05), 10: (0, 1), 11: (1, 1)}
    for position, vector in directions.items():
        hidden[0, position] = torch.tensor(vector)
    decoder = nn.Module()
    decoder.norm = nn.Identity()
    image = torch.zeros(1, length, dtype=torch.bool)
    image[0, 2:10] = True
    inputs = StageInput(
        hidden=hidden, spans=find_visual_spans(image, (2, 4)), query_index=torch.tensor([11]),
        valid=torch.ones(1, length, dtype=torch.bool), layer=_KeysAreInputs(width), layer_input=layer_input,
        position_embeddings=(torch.ones(1, length, width), torch.zeros(1, length, width)), decoder=decoder,
    )
    config = dpn.PyramidConfig(stages=[dpn.SelectionStage(0, keep_ratio=0.5)],
                               strategy=DARTConfig(image_pivots=1, text_pivots=1))
    plan = DuplicationAwareSelection(config, dpn.geometry_of(tiny_llava())).plan(0, inputs)
    # Keep 4: the image pivot (5) plus 3 claimed by the 2 pivots in shares 2 and 1. Pivot 5, (1, 0),
    # claims the two least similar: 4 (-1, 0) and 8 (-0.7, 0.7). The text pivot 10, (0, 1), claims
    # the least similar of what is left {2, 3, 6, 7, 9}: 7 (0, -1).
    assert plan.representatives.tolist() == [4, 5, 7, 8]
    assert plan.grids == [(1, 4)] and torch.equal(plan.rows, hidden[0, [4, 5, 7, 8]])


@pytest.mark.parametrize("bad, message", [
    (dict(image_pivots=0), "image_pivots must be an int >= 1"),
    (dict(text_pivots=-1), "text_pivots must be an int >= 0"),
    (dict(pivot_norm="linf"), "pivot_norm must be one of"),
])
def test_bad_options_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        DARTConfig(**bad)


def test_one_stage_only_and_bad_specs():
    with pytest.raises(ValueError, match="dart prunes once"):
        dpn.PyramidConfig(stages=[dpn.SelectionStage(1, 0.5), dpn.SelectionStage(2, 0.5)], strategy=DARTConfig())
    with pytest.raises(ValueError, match="pyramid spec 'dart:2'"):
        dpn.presets.from_spec("dart:2", tiny_llava())
