"""Analytic FLOPs against torch.utils.flop_counter on the tiny model."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dpn
from dpn.flops import decoder_flops, path_flops, segment_layer_tokens, vision_flops
from helpers import batch_of, make_prompt, pixels, tiny_llava

DECODER_LAYER = re.compile(r"language_model\.layers\.\d+$")


def _measured(model, batch, images, **kwargs):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(**batch, pixel_values=images, **kwargs)
    counts = counter.get_flop_counts()
    layers = sum(sum(ops.values()) for name, ops in counts.items() if DECODER_LAYER.search(name))
    vision = sum(
        sum(ops.values()) for name, ops in counts.items()
        if name.endswith("model.vision_tower") or name.endswith("model.multi_modal_projector")
    )
    return out, layers, vision


def test_vanilla_flops_match_flop_counter():
    # Eager attention: the CPU sdpa kernel is not in the FLOP counter's registry.
    model = tiny_llava(attn="eager")
    batch = batch_of([make_prompt(3, 5, seed=1)])
    out, measured, measured_vision = _measured(model, batch, pixels(1))
    tokens = batch["input_ids"].shape[1]
    analytic = decoder_flops(model.config.text_config, [tokens] * 6)
    assert analytic == pytest.approx(measured, rel=0.02)
    assert vision_flops(model.config.vision_config, 64) == pytest.approx(measured_vision, rel=0.02)


@pytest.mark.parametrize("forced", [0, 1, 2, [2, 0, 1]])
def test_pyramid_flops_match_flop_counter(forced):
    model = tiny_llava(attn="eager")
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    batch = batch_of([make_prompt(3, 5, seed=1)])
    out, measured, _ = _measured(model, batch, pixels(1), force_experts=forced)
    assert out.routing.flops[0].item() == pytest.approx(measured, rel=0.02)
    vanilla = decoder_flops(model.config.text_config, [batch["input_ids"].shape[1]] * 6)
    assert out.routing.vanilla_flops[0].item() == pytest.approx(vanilla)
    if forced != 0:
        assert out.routing.flops_ratio[0] < 1


def test_gqa_and_gated_mlp_are_counted():
    config = tiny_llava().config.text_config  # 4 query heads, 2 key/value heads of size 16
    one = decoder_flops(config, [1], [1])
    d, h, m = 64, 16, 128
    assert one == 2 * d * (4 * h + 2 * 2 * h + 4 * h) + 4 * 4 * h + 3 * 2 * d * m


def test_segment_layer_tokens_expands_per_layer():
    assert segment_layer_tokens(6, [1, 2, 4], [10, 8, 6, 4]) == [10, 10, 8, 6, 6, 4]


@pytest.mark.parametrize("spec, table", [("fastv:K=2,R=0.5", 0.55), ("fastv:K=2,R=0.75", 0.32)])
def test_fastv_convention_reproduces_fastv_table_1(spec, table):
    """FastV's Table 1 (LLaVA-1.5-13B, 36 system + 576 image tokens, FLOPs as it counts them)."""
    from dpn.lab.families.architectures import model_config

    config = model_config("llava-1.5-13b")
    rows = path_flops(config, dpn.presets.from_spec(spec, config), text_tokens=36, convention="fastv")
    assert rows[0]["ratio"] == pytest.approx(table, abs=0.005)
    ours = path_flops(config, dpn.presets.from_spec(spec, config), text_tokens=36)
    assert ours[0]["ratio"] != pytest.approx(rows[0]["ratio"], abs=1e-4)  # the conventions differ


def test_unknown_convention_is_an_error():
    with pytest.raises(ValueError, match="convention must be one of"):
        dpn.flops.decoder_flops(tiny_llava().config.text_config, [10], convention="macs")
