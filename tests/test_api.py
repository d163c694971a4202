"""Saving and loading pyramids (safetensors only), and the full save_pretrained round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlavaForConditionalGeneration

import dpn
from dpn.api import WEIGHTS_NAME
from dpn.config import CONFIG_VERSION
from helpers import batch_of, make_prompt, pixels, tiny_llava


def _logits(model, batch, images):
    with torch.no_grad():
        return model(**batch, pixel_values=images).logits


@pytest.fixture
def trained_pyramid(tmp_path):
    model = tiny_llava()
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    with torch.no_grad():  # make the routers differ from a fresh initialisation
        for parameter in model.pyramid.parameters():
            parameter.add_(torch.randn_like(parameter))
    return model


def test_save_load_reproduces_logits_exactly(tmp_path, trained_pyramid):
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(6, 2, seed=2)])
    images = pixels(2)
    expected = _logits(trained_pyramid, batch, images)
    dpn.save_pyramid(trained_pyramid, tmp_path)
    assert json.loads((tmp_path / "pyramid_config.json").read_text())["version"] == CONFIG_VERSION

    fresh = tiny_llava()
    dpn.load_pyramid(fresh, tmp_path)
    assert torch.equal(_logits(fresh, batch, images), expected)
    assert dpn.get_pyramid_config(fresh) == dpn.get_pyramid_config(trained_pyramid)


def test_save_pretrained_round_trip(tmp_path, trained_pyramid):
    batch = batch_of([make_prompt(3, 5, seed=1)])
    images = pixels(1)
    expected = _logits(trained_pyramid, batch, images)
    trained_pyramid.save_pretrained(tmp_path)
    dpn.save_pyramid(trained_pyramid, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert not any(key.startswith("pyramid.") for key in handle.keys())  # a plain transformers checkpoint

    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    dpn.load_pyramid(reloaded, tmp_path)
    assert torch.equal(_logits(reloaded, batch, images), expected)


def test_load_replaces_an_existing_pyramid(tmp_path, trained_pyramid):
    dpn.save_pyramid(trained_pyramid, tmp_path)
    other = tiny_llava()
    dpn.apply_pyramid(other, dpn.PyramidConfig(stages=[dpn.PoolingStage(layer=0, experts=[(1, 1)])]))
    dpn.load_pyramid(other, tmp_path)
    assert len(other.pyramid.routers) == len(trained_pyramid.pyramid.routers)


@pytest.mark.parametrize("change", [{"layers": 8}, {"hidden": True}])
def test_load_into_a_different_model_is_a_clear_error(tmp_path, trained_pyramid, change):
    dpn.save_pyramid(trained_pyramid, tmp_path)
    if "layers" in change:
        other = tiny_llava(layers=change["layers"])
        message = "num_layers"
    else:
        other = tiny_llava(hidden=128)
        message = "hidden_size"
    with pytest.raises(ValueError, match=message):
        dpn.load_pyramid(other, tmp_path)


def test_truncated_weights_are_a_clear_error(tmp_path, trained_pyramid):
    dpn.save_pyramid(trained_pyramid, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        dpn.load_pyramid(tiny_llava(), tmp_path)


def test_corrupted_config_is_a_clear_error(tmp_path, trained_pyramid):
    dpn.save_pyramid(trained_pyramid, tmp_path)
    (tmp_path / "pyramid_config.json").write_text('{"stages": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        dpn.load_pyramid(tiny_llava(), tmp_path)


def test_missing_files_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="save them with dpn.save_pyramid"):
        dpn.load_pyramid(tiny_llava(), tmp_path)


def test_pyramid_keys_are_left_out_of_save_pretrained_only_while_applied(tmp_path):
    model = tiny_llava()
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    assert any(k.startswith("pyramid.") for k in model._keys_to_ignore_on_save)
    dpn.remove_pyramid(model)
    assert not any(k.startswith("pyramid.") for k in model._keys_to_ignore_on_save)


def test_router_weights_follow_model_dtype():
    model = tiny_llava().to(torch.bfloat16)
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    assert {p.dtype for p in model.pyramid.parameters()} == {torch.bfloat16}
    batch = batch_of([make_prompt(3, 5, seed=1)])
    with torch.no_grad():
        out = model(**batch, pixel_values=pixels(1).to(torch.bfloat16), force_experts=2)
    assert out.logits.dtype == torch.bfloat16 and out.routing.visual_tokens[0, -1] < 64


def test_the_old_name_of_a_strategys_config_still_answers_with_a_warning():
    model = tiny_llava()
    dpn.apply_pyramid(model, dpn.presets.fastv(model.config))
    strategy = dpn.get_pyramid(model)
    with pytest.warns(DeprecationWarning, match="strategy_config"):
        assert strategy.options is strategy.strategy_config
