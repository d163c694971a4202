"""PyramidConfig: presets, JSON round trip, and clear errors for bad configurations."""

from __future__ import annotations

import json

import pytest
import torch

import dpn
from dpn.strategies.pooling import PAPER_EXPERTS, reachable_grids
from dpn.lab.families.architectures import model_config
from helpers import GRID, batch_of, make_prompt, pixels, tiny_llava, IMAGE_TOKEN_ID


def test_paper_default_on_llava_7b_geometry_is_the_paper_schedule():
    config = dpn.presets.paper(model_config("llava-1.5-7b"))
    assert [s.layer for s in config.stages] == [7, 15, 23]
    assert all(s.experts == list(PAPER_EXPERTS) for s in config.stages)
    assert config.strategy.router_temperature == 10.0 and config.strategy.routing_loss_weight == 0.001


def test_paper_default_scales_with_depth_and_fits_any_grid():
    config = dpn.presets.paper(tiny_llava().config)
    assert [s.layer for s in config.stages] == [1, 2, 4]
    # A 6x6 grid cannot take 1x2 three times (6 -> 3 -> 1.5): the preset drops what would not divide.
    model_config = tiny_llava().config
    model_config.vision_config.image_size = 24  # 6 x 6 patches of 4
    config = dpn.presets.paper(model_config)
    config.validate_for(dpn.geometry_of(model_config))
    assert all(g[1] >= 1 for g in reachable_grids((6, 6), config.stages, config.strategy.min_tokens_to_pool))


def test_json_round_trip(tmp_path):
    config = dpn.PyramidConfig(
        stages=[dpn.PoolingStage(layer=2, experts=[(1, 1), (2, 2)])], positions="keep",
        strategy=dpn.DPNConfig(pooling="avg", expert_scales=[[0.0, 2.0]]),
    )
    path = config.save(tmp_path)
    assert dpn.PyramidConfig.load(path) == config
    assert dpn.PyramidConfig.load(tmp_path) == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stages=[]), "at least one stage"),
        (dict(stages=[dpn.PoolingStage(2, [(1, 1)]), dpn.PoolingStage(1, [(1, 1)])]), "strictly increasing"),
        (dict(stages=[dpn.PoolingStage(1, [(1, 1)])], strategy=dict(pooling="median")), "pooling must be one of"),
        (dict(stages=[dpn.PoolingStage(1, [(1, 1)])], router_input="router_token"), "router_token_id"),
        (dict(stages=[dpn.PoolingStage(1, [(1, 1)])], strategy=dict(router_temperature=0)), "router_temperature"),
        (dict(stages=[dpn.PoolingStage(1, [(1, 1)])], strategy=dict(expert_scales=[[0.0, 1.0]])), "expert_scales"),
        (dict(stages=[dpn.PoolingStage(1, [(1, 1)])], version=99), "newer than this dpn"),
        (dict(stages=[dpn.PoolingStage(1, [(1, 1)])], strategy=dict(routing_loss_weight=float("nan"))),
         "routing_loss_weight must be a finite number"),
        (dict(stages=[dpn.PoolingStage(1, [(1, 1)])], strategy=dict(routing_loss_weight=float("inf"))),
         "routing_loss_weight must be a finite number"),
        (dict(stages=[dpn.PoolingStage(1, [(1, 1)])], strategy=dict(routing_loss_weight=-0.1)),
         "routing_loss_weight must be >= 0"),
        (dict(stages=[dpn.PoolingStage(1, [(1, 1)])], strategy="static"), "strategy must be a strategy config"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        strategy = kwargs.get("strategy")
        if isinstance(strategy, dict):  # the DPN config's own checks run when it is built
            kwargs = {**kwargs, "strategy": dpn.DPNConfig(**strategy)}
        dpn.PyramidConfig(**kwargs)


@pytest.mark.parametrize("expert", [(0, 1), (1, 2, 3), (1.5, 1), "2x2"])
def test_bad_expert_is_a_clear_error(expert):
    with pytest.raises(ValueError, match="expert"):
        dpn.PoolingStage(layer=1, experts=[expert])


def test_unknown_json_keys_are_a_clear_error(tmp_path):
    (tmp_path / "pyramid_config.json").write_text('{"stages": [], "strides": 2}')
    with pytest.raises(ValueError, match="unknown pyramid config keys \\['strides'\\]"):
        dpn.PyramidConfig.load(tmp_path)
    (tmp_path / "pyramid_config.json").write_text('{"stages": [{"layer": 1, "experts": [[2, 2]]}], '
                                                  '"strategy": {"name": "static"}}')
    with pytest.raises(ValueError, match="no 'version'"):
        dpn.PyramidConfig.load(tmp_path)
    (tmp_path / "pyramid_config.json").write_text('{"stages": [{"layer": 1, "experts": [[2, 2]]}], "version": 2, '
                                                  '"strategy": {"name": "static", "router_temperature": 5}}')
    with pytest.raises(ValueError, match="unknown static strategy keys \\['router_temperature'\\]"):
        dpn.PyramidConfig.load(tmp_path)


# ------------------------------------------------------------------ invariant 7: bad input at apply / run
@pytest.mark.parametrize("layer", [5, 6, -2])
def test_stage_out_of_range_is_rejected_at_apply(layer):
    with pytest.raises(ValueError, match="out of range"):
        dpn.apply_pyramid(tiny_llava(), dpn.PyramidConfig(stages=[dpn.PoolingStage(layer, [(1, 1)])]))


def test_only_the_projector_compresses_before_the_first_layer():
    with pytest.raises(ValueError, match="only the projector strategy"):
        dpn.PyramidConfig(stages=[dpn.PoolingStage(-1, [(2, 2)])])


def test_stride_that_does_not_divide_the_grid_is_rejected_at_apply():
    model = tiny_llava()
    with pytest.raises(ValueError, match=r"\(3, 3\).*does not divide the 8x8"):
        dpn.apply_pyramid(model, dpn.PyramidConfig(stages=[dpn.PoolingStage(1, [(1, 1), (3, 3)])]))
    # ... also when only a routing path makes it fail: 8 -> 4 -> 2 rows, then 4x1 does not divide 2.
    config = dpn.PyramidConfig(
        stages=[dpn.PoolingStage(1, [(1, 1), (2, 1)]), dpn.PoolingStage(2, [(2, 1)]), dpn.PoolingStage(3, [(4, 1)])]
    )
    with pytest.raises(ValueError, match="does not divide the 2x8"):
        dpn.apply_pyramid(model, config)
    assert not dpn.has_pyramid(model)


def test_image_token_count_not_matching_the_grid_is_a_clear_error():
    model = tiny_llava()
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    short = [20, 21] + [IMAGE_TOKEN_ID] * (GRID[0] * GRID[1] - 4) + [22, 23]
    with pytest.raises(ValueError, match="image tokens but the images give"):
        model(**batch_of([short]), pixel_values=pixels(1))
    # The batch total matches two images, but neither sample holds a whole grid.
    long = [20, 21] + [IMAGE_TOKEN_ID] * (GRID[0] * GRID[1] + 4) + [22, 23]
    with pytest.raises(ValueError, match="not a whole number of 8x8"):
        model(**batch_of([short, long]), pixel_values=pixels(2))


def test_unsupported_models_and_double_apply_are_clear_errors():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2))
    config = dpn.PyramidConfig(stages=[dpn.PoolingStage(0, [(1, 1)])])
    with pytest.raises(ValueError, match="no adapter for model_type 'llama'"):
        dpn.apply_pyramid(text_only, config)
    model = tiny_llava()
    dpn.apply_pyramid(model, config)
    with pytest.raises(ValueError, match="already has a pyramid"):
        dpn.apply_pyramid(model, config)


@pytest.mark.parametrize("backbone", ["qwen3"])
def test_more_text_backbones_match_vanilla(backbone):
    model = tiny_llava(backbone)
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(6, 2, seed=2)])
    with torch.no_grad():
        vanilla = model(**batch, pixel_values=pixels(2)).logits
        dpn.apply_pyramid(model, dpn.PyramidConfig(stages=[dpn.PoolingStage(layer, [(1, 1)]) for layer in (1, 2, 4)]))
        out = model(**batch, pixel_values=pixels(2)).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out[mask], vanilla[mask], atol=1e-5, rtol=0)


def test_unsupported_backbones_and_families_say_why():
    from transformers import Gemma3TextConfig, Qwen3VLConfig

    model = tiny_llava()
    model.config.text_config = Gemma3TextConfig(vocab_size=96, hidden_size=64, num_hidden_layers=6)
    with pytest.raises(ValueError, match="'gemma3_text' text backbone.*supported: \\('llama'"):
        dpn.apply_pyramid(model, dpn.PyramidConfig(stages=[dpn.PoolingStage(1, [(1, 1)])]))
    with pytest.raises(ValueError, match="not support 'qwen3_vl' yet: .*DeepStack"):
        dpn.geometry_of(Qwen3VLConfig())


def test_full_feature_strategy_with_class_token_is_rejected():
    model = tiny_llava()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="class token"):
        dpn.apply_pyramid(model, dpn.PyramidConfig(stages=[dpn.PoolingStage(1, [(1, 1)])]))


@pytest.mark.parametrize("forced, message", [([0, 1], "has 2 entries"), (3, "expert index in 0..2"), (-2, "-1"),
                                             (1.5, "expert indices"), ([1.0, 0.0, 2.0], "expert indices"),
                                             (True, "expert indices"), ("2", "expert indices"),
                                             ([0, None, 1], "expert indices")])
def test_bad_force_experts_is_a_clear_error(forced, message):
    model = tiny_llava()
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    with pytest.raises(ValueError, match=message):
        model(**batch_of([make_prompt(2, 2)]), pixel_values=pixels(1), force_experts=forced)


def test_router_token_input():
    router_token = 9
    model = tiny_llava()
    config = dpn.presets.paper(model.config, router_input="router_token", router_token_id=router_token)
    dpn.apply_pyramid(model, config)
    with_token = make_prompt(2, 2) + [router_token, 30, 31]
    with torch.no_grad():
        out = model(**batch_of([with_token]), pixel_values=pixels(1))
        # The routers read the router token, not the last token: text after it does not change routing.
        changed_tail = model(**batch_of([with_token[:-2] + [40, 41]]), pixel_values=pixels(1))
    assert out.routing.experts[0, 0] >= 0
    torch.testing.assert_close(out.routing.router_probs[0], changed_tail.routing.router_probs[0])
    with pytest.raises(ValueError, match="no router token"):
        model(**batch_of([make_prompt(2, 2)]), pixel_values=pixels(1))


def test_mistral_backbone_runs_with_pooling():
    model = tiny_llava("mistral")
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    with torch.no_grad():
        out = model(**batch_of([make_prompt(2, 2)]), pixel_values=pixels(1), force_experts=2)
        ids = model.generate(**batch_of([make_prompt(2, 2)]), pixel_values=pixels(1), max_new_tokens=3,
                             do_sample=False, pad_token_id=0)
    assert out.routing.visual_tokens[0].tolist() == [64, 16, 4, 4] and ids.shape[1] == 70 + 3


@pytest.mark.parametrize("spec", ["static:0x2", "static:2x0", "static:-1x2", "projector:0x1", "projector:-2x-2"])
def test_zero_or_negative_strides_are_clear_errors(spec):
    config = tiny_llava().config
    with pytest.raises(ValueError, match=f"stride of pyramid spec '{spec}'.*positive ints"):
        dpn.presets.from_spec(spec, config)
    stride = tuple(int(k) for k in spec.partition(":")[2].split("x"))
    preset = dpn.presets.static if spec.startswith("static") else dpn.presets.projector
    with pytest.raises(ValueError, match="positive ints"):
        preset(config, stride)
    with pytest.raises(ValueError, match="expert of the stage after layer 1 .*positive ints"):
        dpn.PoolingStage(1, [stride])


@pytest.mark.parametrize("spec", [None, 2, ["fastv:0.5"]])
def test_a_spec_that_is_not_a_string_is_a_clear_error(spec):
    with pytest.raises(ValueError, match="a pyramid spec is a string .*'none'"):
        dpn.presets.from_spec(spec, tiny_llava().config)


@pytest.mark.parametrize("version, message", [(99, "newer than this dpn supports"), (0, "whole number >= 1"),
                                              ("3", "whole number >= 1"), (True, "whole number >= 1")])
def test_a_file_of_an_unknown_version_is_refused_not_migrated(tmp_path, version, message):
    data = dpn.PyramidConfig(stages=[dpn.PoolingStage(1, [(1, 1), (2, 2)])]).to_dict()
    (tmp_path / "pyramid_config.json").write_text(json.dumps({**data, "version": version}))
    with pytest.raises(ValueError, match=message):
        dpn.PyramidConfig.load(tmp_path)


def test_a_current_file_keeps_its_version_and_fields():
    config = dpn.presets.pdrop(tiny_llava().config)
    assert dpn.PyramidConfig.from_dict(config.to_dict()) == config
