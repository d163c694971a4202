"""Routed selection: DPN's fitted routers choosing how many FastV-ranked tokens each sample keeps (saving and
loading: mixed experts too)."""

from __future__ import annotations

import pytest
import torch

import dpn
from dpn.budget import calibrate_router_bias
from dpn.router_fit import fit_routers
from dpn.spans import find_visual_spans
from dpn.strategies.selection import kept_count
from helpers import (
    GRID, IMAGE_TOKEN_ID, batch_of, check_cached_generation_matches_recompute, check_routed_flops_match_counter,
    make_prompt, pixels, tiny_llava,
)

VISUAL = GRID[0] * GRID[1]
RATIOS = (1.0, 0.5, 0.25)


def _model(seed: int = 0, attn: str = "sdpa", **overrides):
    model = tiny_llava(seed=seed, attn=attn)
    dpn.apply_pyramid(model, dpn.presets.from_spec("select:0.2", model.config, **overrides))
    return model


def _batch(n: int = 2):
    return {**batch_of([make_prompt(2 + i, 3 + i % 2, seed=i) for i in range(n)]), "pixel_values": pixels(n)}


def test_the_preset_is_one_stage_at_fastvs_layer_with_falling_keep_ratios():
    config = dpn.presets.from_spec("select", tiny_llava().config)
    (stage,) = config.stages
    assert stage.layer == dpn.strategies.fastv.FASTV_LAYER - 1 and stage.experts == list(RATIOS)
    assert config.positions == "keep" and config.strategy.router_training == "fit"
    assert dpn.presets.from_spec("select:0.3", tiny_llava().config).strategy.fit_flops_weight == 0.3
    with pytest.raises(ValueError, match="pyramid spec 'select:half': the FLOPs weight must be a number"):
        dpn.presets.from_spec("select:half", tiny_llava().config)
    finer = dpn.presets.select(tiny_llava().config, keep_ratios=(1, 0.5, 0.25, 0.125), fit_flops_weight=0.2, layer=3)
    assert (finer.stages[0].layer, finer.stages[0].experts) == (2, [1.0, 0.5, 0.25, 0.125])
    with pytest.raises(ValueError, match="layer K must be in 1..5 for a 6-layer model"):
        dpn.presets.select(tiny_llava().config, layer=6)


@pytest.mark.parametrize("expert, ratio", list(enumerate(RATIOS)))
def test_each_expert_keeps_what_fastv_keeps_at_its_ratio(expert, ratio):
    model = _model(seed=1)
    batch = _batch()
    with torch.no_grad():
        routed = model(**batch, force_experts=[expert])
    assert routed.routing.visual_tokens.tolist() == [[VISUAL, kept_count(VISUAL, ratio)]] * 2
    reference = tiny_llava(seed=1)
    if ratio < 1:
        dpn.apply_pyramid(reference, dpn.presets.fastv(reference.config, keep_ratio=ratio))
    with torch.no_grad():
        expected = reference(**batch)
    torch.testing.assert_close(routed.logits, expected.logits, atol=1e-5, rtol=0)


def test_the_training_guard_counts_what_each_keep_ratio_leaves():
    model = _model(seed=1, min_kept_tokens=20)
    spans = find_visual_spans(_batch()["input_ids"] == IMAGE_TOKEN_ID, GRID)
    kept = dpn.get_pyramid(model).kept_tokens(0, spans, [0, 1])
    assert kept.tolist() == [[kept_count(VISUAL, r) for r in RATIOS]] * 2
    model.train()
    drawn = torch.cat([model(**_batch()).routing.experts[:, 0] for _ in range(10)])
    assert set(drawn.tolist()) == {0, 1}  # 0.25 leaves 16 tokens, under the guard's 20


def test_batched_matches_each_sample_alone_with_mixed_experts():
    model = _model(seed=4)
    prompts = [make_prompt(2, 3, seed=1), make_prompt(9, 1, seed=2), make_prompt(1, 2, images=2, seed=4)]
    images = pixels(4)
    slices = torch.split(images, [1, 1, 2])
    forced = torch.tensor([[1], [0], [2]])
    with torch.no_grad():
        together = model(**batch_of(prompts), pixel_values=images, force_experts=forced)
        for row, prompt in enumerate(prompts):
            alone = model(**batch_of([prompt]), pixel_values=slices[row], force_experts=forced[row:row + 1])
            valid = together.attention_mask[row].bool()
            torch.testing.assert_close(together.logits[row][valid], alone.logits[0], atol=1e-4, rtol=0)
    assert together.routing.visual_tokens[:, 1].tolist() == [32, 64, 2 * kept_count(VISUAL, 0.25)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generation_matches_full_recompute(attn):
    model = _model(seed=3, attn=attn)
    check_cached_generation_matches_recompute(model, _batch(), torch.tensor([[1], [2]]), [IMAGE_TOKEN_ID], new_tokens=4)


@pytest.mark.parametrize("expert", [1, 2])
def test_flops_match_the_flop_counter_and_each_path_of_the_config(expert):
    check_routed_flops_match_counter("select:0.2", expert, [kept_count(VISUAL, r) for r in RATIOS])


def test_training_draws_paths_and_fitting_then_calibration_move_only_the_routers():
    model = _model(seed=2, fit_keep_share=0.5)
    batch = _batch(4)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100)
    labels[:, :-2] = -100
    batch["labels"] = labels
    model.train()
    drawn = torch.cat([model(**batch).routing.experts[:, 0] for _ in range(30)])
    assert abs((drawn == 0).float().mean().item() - 0.5) < 0.15 and set(drawn.tolist()) == {0, 1, 2}
    out = model(**batch)
    out.loss.backward()
    pyramid = dpn.get_pyramid(model)
    assert all(p.grad is None or not p.grad.any() for p in pyramid.routers.parameters())
    assert model.model.language_model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    model.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items() if "routers" not in k}
    report = fit_routers(model, [batch], flops_weight=0.2, epochs=3)
    assert report.samples == 4 and len(report.target_shares) == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.eval()
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    bias, ratio = calibrate_router_bias(model, [unlabelled], target=0.7, progress=False)
    with torch.no_grad():
        measured = model(**unlabelled).routing.flops_ratio.mean().item()
    assert bias == pyramid.router_bias and measured == pytest.approx(ratio) and ratio <= 0.7


@pytest.mark.parametrize("spec, kind", [("select:0.2", "RoutedSelection"), ("mixed:0.2", "MixedExperts")])
def test_save_and_load_give_the_same_choices(tmp_path, spec, kind):
    model = tiny_llava(seed=5)
    dpn.apply_pyramid(model, dpn.presets.from_spec(spec, model.config))
    model.eval()
    dpn.save_pyramid(model, tmp_path)
    reloaded = dpn.load_pyramid(tiny_llava(seed=5), tmp_path)
    assert type(dpn.get_pyramid(reloaded)) is getattr(dpn.strategies, kind)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**_batch()).logits, model(**_batch()).logits, atol=0, rtol=0)


@pytest.mark.parametrize("stage, message", [
    ({"layer": 1, "experts": [0.5, 1.0]}, "must fall from the first to the last"),
    ({"layer": 1, "experts": [1.0, 1.5]}, "keep ratio of the stage after layer 1"),
    ({"layer": 1, "experts": []}, "has no experts; give keep ratios"),
])
def test_bad_keep_ratios_are_refused(stage, message):
    with pytest.raises(ValueError, match=message):
        dpn.strategies.RoutedSelectionStage(**stage)


def test_routers_learning_by_gradient_are_refused():
    with pytest.raises(ValueError, match="routed selection fits its routers after training"):
        dpn.strategies.RoutedSelectionConfig(router_training="gradient", probability_scale="value", routing_loss="hinge")
