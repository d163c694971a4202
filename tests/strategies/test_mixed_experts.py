"""Mixed experts: DPN's fitted routers choosing, per sample, between pooling a grid and selecting its tokens."""

from __future__ import annotations

import json

import pytest
import torch

import dpn
from dpn.router_fit import fit_routers
from dpn.strategies import KeepExpert, MixedExpertsStage, PoolExpert
from dpn.strategies.selection import kept_count
from helpers import (
    GRID, IMAGE_TOKEN_ID, batch_of, check_cached_generation_matches_recompute, check_routed_flops_match_counter,
    make_prompt, pixels, tiny_llava,
)

VISUAL = GRID[0] * GRID[1]
# The preset's experts and the visual tokens each leaves an 8x8 grid.
EXPERTS = [PoolExpert((1, 1)), PoolExpert((1, 2)), KeepExpert(0.5), PoolExpert((2, 2)), KeepExpert(0.25)]
KEPT = [VISUAL, VISUAL // 2, kept_count(VISUAL, 0.5), VISUAL // 4, kept_count(VISUAL, 0.25)]


def _model(seed: int = 0, attn: str = "sdpa", **overrides):
    model = tiny_llava(seed=seed, attn=attn)
    dpn.apply_pyramid(model, dpn.presets.from_spec("mixed:0.2", model.config, **overrides))
    return model


def _batch(n: int = 2):
    return {**batch_of([make_prompt(2 + i, 3 + i % 2, seed=i) for i in range(n)]), "pixel_values": pixels(n)}


def _reference(seed: int, expert):
    """The peer each expert is: static pooling at its stride or FastV at its keep ratio, at the same layer."""
    model = tiny_llava(seed=seed)
    if isinstance(expert, KeepExpert):
        dpn.apply_pyramid(model, dpn.presets.fastv(model.config, keep_ratio=expert.ratio))
    elif expert.stride != (1, 1):
        dpn.apply_pyramid(model, dpn.PyramidConfig(
            stages=[dpn.strategies.PoolingStage(1, [expert.stride])], strategy=dpn.strategies.StaticConfig(),
            positions="keep"))
    return model


def test_the_preset_is_one_stage_at_fastvs_layer_with_pooling_and_selection_experts():
    config = dpn.presets.from_spec("mixed", tiny_llava().config)
    (stage,) = config.stages
    assert stage.layer == dpn.strategies.fastv.FASTV_LAYER - 1 and stage.experts == EXPERTS
    assert config.positions == "keep" and config.strategy.router_training == "fit"
    assert dpn.presets.from_spec("mixed:0.3", tiny_llava().config).strategy.fit_flops_weight == 0.3
    custom = dpn.presets.mixed(tiny_llava().config, experts=({"pool": [1, 1]}, {"keep": 0.5}, {"pool": [4, 4]}),
                               layer=3)
    assert (custom.stages[0].layer, custom.stages[0].experts) == (2, [PoolExpert((1, 1)), KeepExpert(0.5),
                                                                      PoolExpert((4, 4))])
    # A stride that does not divide the model's 8x8 grid is left out of the preset.
    assert dpn.presets.mixed(tiny_llava().config, experts=({"pool": [1, 1]}, {"pool": [3, 3]})).stages[0].experts == [
        PoolExpert((1, 1))]


def test_the_config_round_trips_through_json(tmp_path):
    config = dpn.presets.from_spec("mixed:0.2", tiny_llava().config)
    config.save(tmp_path / "pyramid_config.json")
    saved = json.loads((tmp_path / "pyramid_config.json").read_text())
    assert saved["stages"][0]["experts"][:3] == [{"pool": [1, 1]}, {"pool": [1, 2]}, {"keep": 0.5}]
    assert dpn.PyramidConfig.load(tmp_path / "pyramid_config.json").stages == config.stages


@pytest.mark.parametrize("expert", range(len(EXPERTS)))
def test_each_expert_is_the_peer_it_names(expert):
    model = _model(seed=1)
    batch = _batch()
    with torch.no_grad():
        routed = model(**batch, force_experts=[expert])
        expected = _reference(1, EXPERTS[expert])(**batch)
    assert routed.routing.visual_tokens.tolist() == [[VISUAL, KEPT[expert]]] * 2
    torch.testing.assert_close(routed.logits, expected.logits, atol=1e-5, rtol=0)


def test_batched_matches_each_sample_alone_with_pooled_and_selected_samples_together():
    model = _model(seed=4)
    prompts = [make_prompt(2, 3, seed=1), make_prompt(9, 1, seed=2), make_prompt(1, 2, images=2, seed=4),
               make_prompt(4, 4, seed=3)]
    images = pixels(5)
    slices = torch.split(images, [1, 1, 2, 1])
    forced = torch.tensor([[3], [0], [4], [1]])
    with torch.no_grad():
        together = model(**batch_of(prompts), pixel_values=images, force_experts=forced)
        for row, prompt in enumerate(prompts):
            alone = model(**batch_of([prompt]), pixel_values=slices[row], force_experts=forced[row:row + 1])
            valid = together.attention_mask[row].bool()
            torch.testing.assert_close(together.logits[row][valid], alone.logits[0], atol=1e-4, rtol=0)
    assert together.routing.visual_tokens[:, 1].tolist() == [KEPT[3], KEPT[0], 2 * KEPT[4], KEPT[1]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generation_matches_full_recompute(attn):
    model = _model(seed=3, attn=attn)
    check_cached_generation_matches_recompute(model, _batch(), torch.tensor([[3], [2]]), [IMAGE_TOKEN_ID], new_tokens=4)


@pytest.mark.parametrize("expert", [1, 2, 3])
def test_flops_match_the_flop_counter_and_each_path_of_the_config(expert):
    check_routed_flops_match_counter("mixed:0.2", expert, KEPT)


def test_training_draws_every_expert_and_fitting_moves_only_the_routers():
    model = _model(seed=2)
    batch = _batch(4)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100)
    labels[:, :-2] = -100
    batch["labels"] = labels
    model.train()
    drawn = torch.cat([model(**batch).routing.experts[:, 0] for _ in range(20)])
    assert set(drawn.tolist()) == set(range(len(EXPERTS)))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "routers" not in k}
    routers = [p.clone() for p in dpn.get_pyramid(model).routers.parameters()]
    report = fit_routers(model, [batch], flops_weight=0.2, epochs=3)
    assert report.samples == 4 and len(report.target_shares[0]) == len(EXPERTS)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(a, b) for a, b in zip(routers, dpn.get_pyramid(model).routers.parameters()))


def test_the_training_guard_counts_what_each_expert_leaves():
    from dpn.spans import find_visual_spans

    model = _model(seed=1)
    spans = find_visual_spans(_batch()["input_ids"] == IMAGE_TOKEN_ID, GRID)
    assert dpn.get_pyramid(model).kept_tokens(0, spans, [0, 1]).tolist() == [KEPT] * 2


@pytest.mark.parametrize("experts, message", [
    ([{"keep": 0.5}, {"pool": [1, 1]}], "must leave fewer or as many tokens"),
    ([{"keep": 1.5}], "the keep ratio of expert 0 of the stage after layer 1"),
    ([{"pool": [0, 2]}], "the pooling stride of expert 0"),
    ([{"drop": 0.5}], "an expert is {'pool': \\[kh, kw\\]}"),
    ([[2, 2]], "an expert is {'pool'"),
    ([], "has no experts"),
])
def test_bad_experts_are_refused(experts, message):
    with pytest.raises(ValueError, match=message):
        MixedExpertsStage(1, experts=experts)


def test_pooling_after_a_selecting_stage_is_refused():
    stages = [MixedExpertsStage(1, [{"pool": [1, 1]}, {"keep": 0.5}]), MixedExpertsStage(3, [{"pool": [1, 1]},
                                                                                            {"pool": [1, 2]}])]
    with pytest.raises(ValueError, match="after a stage that selects, only select"):
        dpn.PyramidConfig(stages=stages, strategy=dpn.strategies.MixedExpertsConfig(), positions="keep")


def test_a_stride_that_does_not_divide_the_grid_is_refused_at_apply():
    model = tiny_llava()
    config = dpn.PyramidConfig(stages=[MixedExpertsStage(1, [{"pool": [1, 1]}, {"pool": [3, 3]}])],
                               strategy=dpn.strategies.MixedExpertsConfig(), positions="keep")
    with pytest.raises(ValueError, match="pool 3x3 of the stage after layer 1 does not divide the 8x8 grid"):
        dpn.apply_pyramid(model, config)


def test_the_router_bias_moves_experts_that_keep_as_many_tokens_alike():
    model = _model(seed=6).eval()
    pyramid = dpn.get_pyramid(model)
    assert pyramid.bias_scales(0) == [0, 1, 1, 2, 2]  # log2 of each expert's compression
    hidden = torch.randn(5, model.config.text_config.hidden_size)
    probs, _ = pyramid.route(0, hidden)
    pyramid.router_bias = 1.5
    biased, _ = pyramid.route(0, hidden)
    torch.testing.assert_close(biased[:, 1] / biased[:, 2], probs[:, 1] / probs[:, 2])
    torch.testing.assert_close(biased[:, 3] / biased[:, 4], probs[:, 3] / probs[:, 4])
    assert (biased[:, 3:].sum(1) > probs[:, 3:].sum(1)).all()
    scaled = _model(seed=6, expert_scales=[[0, 1, 2, 3, 4]])
    assert dpn.get_pyramid(scaled).bias_scales(0) == [0, 1, 2, 3, 4]
