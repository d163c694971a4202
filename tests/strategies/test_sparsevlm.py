"""SparseVLM (text raters, in-LLM pruning with recycling): the schedule's arithmetic against the
reference's counts, DPC-KNN and the raters by hand, the first stage's rows against an eager
vanilla forward, FLOPs, and clear errors. The peer contract runs in test_peers.py."""

from __future__ import annotations

import pytest
import torch

import dpn
from dpn.strategies.base import InputLayout
from dpn.strategies.selection import kept_count
from dpn.strategies.sparsevlm import (
    SCHEDULES, candidate_count, cluster_and_merge, rater_positions, recycled_count, stage_layers, tokens_after,
)
from dpn.spans import VisualSpans
from helpers import (
    GRID, IMAGE_TOKEN_ID, batch_of, check_selection_flops_match_counter, make_prompt, pixels, qwen_forward, tiny_llava,
    tiny_qwen_vl,
)

VISUAL = GRID[0] * GRID[1]


def test_the_schedule_counts_as_the_reference_on_llava_1_5():
    # At 192: layer 2 keeps 300 of 576 and recycles 276 -> 83 candidates -> 9 clusters (309 go on).
    assert (candidate_count(276), recycled_count(276), tokens_after(576, 300, True)) == (83, 9, 309)
    assert tokens_after(576, 300, False) == 300 and tokens_after(10, 20, True) == 9 + 1  # always drops one
    assert stage_layers(32) == [2, 6, 15] and stage_layers(6) == [0, 1, 3]
    config = dpn.presets.from_spec("sparsevlm:64", tiny_llava().config)
    assert [kept_count(576, s.keep_ratio) for s in config.stages] == list(SCHEDULES[64])


def test_dpc_knn_makes_dense_centres_and_averages_their_members():
    tokens = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0], [9.0, -9.0]])
    merged, centres = cluster_and_merge(tokens, 2)
    # The two tight groups hold the densest tokens, far from each other: one centre each. The outlier
    # joins the nearer centre (12.7 from the first group, 14.6 from the second).
    groups = sorted(centres.tolist())
    assert groups[0] in (0, 1, 2) and groups[1] in (3, 4)
    means = {tuple(round(v, 4) for v in row.tolist()) for row in merged}
    assert means == {((0.1 + 9.0) / 4, (0.1 - 9.0) / 4), (5.05, 5.0)}


def test_raters_are_the_text_after_the_image_the_visual_tokens_favour():
    width = 4
    hidden = torch.zeros(1, 8, width)
    hidden[0, 1:3] = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])  # two visual tokens
    hidden[0, 3:6] = torch.tensor([[3.0, 0, 0, 0], [0, 1.0, 0, 0], [2.5, 0, 0, 0]])  # text after the image
    spans = VisualSpans()
    spans.add(0, 1, [(1, 2)])
    first = InputLayout(hidden, spans, torch.tensor([5]))
    positions, real = rater_positions(first, spans, torch.tensor([5]))
    # softmax over [3, 0, 2.5] favours positions 3 and 5 above the mean.
    assert positions.tolist() == [[3, 5]] and real.tolist() == [[True, True]]
    shrunk = VisualSpans()
    shrunk.add(0, 1, [(1, 1)])  # one visual token left: the text moved one place left
    positions, _ = rater_positions(first, shrunk, torch.tensor([4]))
    assert positions.tolist() == [[2, 4]]


def test_the_first_stage_keeps_what_the_raters_attend_to_and_recycles_the_rest():
    model = tiny_llava(attn="eager", seed=4)
    batch = batch_of([make_prompt(3, 6, seed=1)])
    with torch.no_grad():
        vanilla = model(**batch, pixel_values=pixels(1), output_attentions=True, output_hidden_states=True)
    config = dpn.presets.from_spec("sparsevlm:192", model.config)
    layer = config.stages[0].layer
    start = int((batch["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0])
    spans = VisualSpans()
    spans.add(0, start, [GRID])
    query = torch.tensor([batch["input_ids"].shape[1] - 1])
    raters, _ = rater_positions(InputLayout(vanilla.hidden_states[0], spans, query), spans, query)
    relevance = vanilla.attentions[layer][0].mean(0)[raters[0]].mean(0)[start:start + VISUAL]
    target = kept_count(VISUAL, config.stages[0].keep_ratio)
    order = relevance.argsort(descending=True, stable=True)
    output = vanilla.hidden_states[layer + 1][0, start:start + VISUAL]
    merged, _ = cluster_and_merge(output[order[target:][:candidate_count(VISUAL - target)]],
                                  recycled_count(VISUAL - target))
    expected = torch.cat([output[order[:target].sort().values], merged])
    dpn.apply_pyramid(model, config)
    hook_input = []
    hook = model.model.language_model.layers[layer + 1].register_forward_pre_hook(
        lambda module, args, kwargs: hook_input.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        out = model(**batch, pixel_values=pixels(1))
    hook.remove()
    torch.testing.assert_close(hook_input[0][0, start:start + expected.shape[0]], expected, atol=1e-5, rtol=1e-4)
    assert out.routing.visual_tokens[0].tolist()[1] == expected.shape[0]


def test_flops_match_the_flop_counter_and_the_config_path():
    check_selection_flops_match_counter(lambda model: dpn.presets.from_spec("sparsevlm:128", model.config), None)


def test_images_of_every_size_on_qwen2_5_vl_keep_their_schedule():
    model = tiny_qwen_vl(seed=0)
    config = dpn.presets.from_spec("sparsevlm:128", model.config)
    assert config.positions == "keep"  # M-RoPE keeps coordinates
    dpn.apply_pyramid(model, config)
    grids = [(4, 6), (8, 8)]
    out = qwen_forward(model, grids)
    for sample, (rows, cols) in enumerate(grids):
        tokens = [rows * cols // 4]  # the 2x2 merger
        for stage in config.stages:
            tokens.append(tokens_after(tokens[-1], kept_count(tokens[0], stage.keep_ratio), True))
        assert out.routing.visual_tokens[sample].tolist() == tokens


def test_bad_specs_are_clear_errors():
    config = tiny_llava().config
    for bad in ("sparsevlm:100", "sparsevlm:0.5", "sparsevlm:x"):
        with pytest.raises(ValueError, match="the budget is one of the reference's"):
            dpn.presets.from_spec(bad, config)
    with pytest.raises(ValueError, match="recycle must be one of"):
        dpn.SparseVLMConfig(recycle="yes")
