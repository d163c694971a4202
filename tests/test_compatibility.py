"""Version-1 files and outputs: what the code before the version-2 config wrote still loads and
gives the same outputs (to kernel rounding; the same greedy tokens) (fixtures in tests/fixtures/v1, written by make_fixtures.py there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpn
from dpn.config import CONFIG_VERSION, read_config
from helpers import IMAGE_TOKEN_ID, batch_of, make_prompt, pixels, tiny_llava

V1 = Path(__file__).parent / "fixtures" / "v1"
FORCED = [[0, 1, 2], [2, 1, 0], [1, 2, 1], [-1, -1, -1]]
EXPECTED = load_file(V1 / "outputs.safetensors")


def fixture_batch():
    """The batch make_fixtures.py used: left-padded, mixed lengths, a two-image sample, a text-only one."""
    prompts = [make_prompt(3, 5, seed=1), make_prompt(9, 2, seed=2), make_prompt(1, 2, images=2, seed=4),
               [11, 12, 13, 14, 15, 16, 17]]
    batch = batch_of(prompts)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[labels == IMAGE_TOKEN_ID] = -100
    return {**batch, "pixel_values": pixels(4), "labels": labels}


# The fixtures were written on one CPU; another CPU's matmul kernels may round differently (2e-7 on
# logits of magnitude 0.6 between two x86 machines running the same torch). A migration that changed
# behaviour moves logits by orders of magnitude more than this tolerance.
KERNEL_ROUNDING = 1e-5


def assert_outputs(model, forced, name):
    with torch.no_grad():
        out = model(**fixture_batch(), force_experts=forced)
    torch.testing.assert_close(out.logits, EXPECTED[f"{name}.logits"], rtol=KERNEL_ROUNDING, atol=KERNEL_ROUNDING)
    torch.testing.assert_close(out.loss.reshape(1), EXPECTED[f"{name}.loss"], rtol=KERNEL_ROUNDING,
                               atol=KERNEL_ROUNDING)


@pytest.mark.parametrize("name", ["static", "random", "projector", "fastv", "pdrop"])
def test_version_1_configs_load_and_give_the_same_logits(name):
    config = dpn.PyramidConfig.load(V1 / f"{name}.json")
    assert config.version == CONFIG_VERSION and config.strategy.name == name
    model = tiny_llava(seed=0)
    dpn.apply_pyramid(model, config)
    forced = None
    if name in ("static", "random", "projector"):
        forced = [[min(e, len(s.experts) - 1) for e, s in zip(row, config.stages)] for row in FORCED]
    assert_outputs(model, forced, name)


@pytest.mark.parametrize("name", ["dpn", "dpn_biased"])
def test_version_1_dpn_checkpoints_load_and_give_the_same_outputs(name):
    model = dpn.load_pyramid(tiny_llava(seed=0), V1 / name)
    assert_outputs(model, FORCED, f"{name}.forced")
    assert_outputs(model, None, f"{name}.routed")  # the routers decide: their weights (and bias) came back
    batch = fixture_batch()
    batch.pop("labels")
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, EXPECTED[f"{name}.generated"])


def test_version_1_migration_moves_each_field_where_it_now_lives(tmp_path):
    config, inference = read_config(V1 / "dpn_biased")
    assert config.strategy == dpn.DPNConfig(pooling="avg", probability_scale="none")
    assert config.positions == "keep" and inference == {"router_bias": "0.8"}
    model = dpn.load_pyramid(tiny_llava(seed=0), V1 / "dpn_biased")
    assert dpn.get_router_bias(model) == 0.8
    # Saved again, it is a current pair whose config no longer holds the bias; it reloads the same.
    dpn.save_pyramid(model, tmp_path)
    saved = json.loads((tmp_path / "pyramid_config.json").read_text())
    assert saved["version"] == CONFIG_VERSION and "router_bias" not in json.dumps(saved)
    assert dpn.get_router_bias(dpn.load_pyramid(tiny_llava(seed=0), tmp_path)) == 0.8
    # The v1 paper config is what today's preset builds.
    assert dpn.PyramidConfig.load(V1 / "dpn") == dpn.presets.paper(tiny_llava().config)


def test_version_2_pdrop_configs_keep_the_ranking_they_were_saved_with(tmp_path):
    """Version 3 made PyramidDrop rank with the next layer (its reference's rule); a version-2 pdrop
    config keeps the stage layer's own ranking, so its outputs do not change."""
    current = dpn.PyramidConfig.load(V1 / "pdrop.json")
    assert current.strategy.ranking == "same_layer"  # v1 -> v2 -> v3
    version_2 = current.to_dict()
    del version_2["strategy"]["ranking"]
    version_2["version"] = 2
    (tmp_path / "pyramid_config.json").write_text(json.dumps(version_2))
    config = dpn.PyramidConfig.load(tmp_path / "pyramid_config.json")
    assert config.strategy.ranking == "same_layer" and config.version == CONFIG_VERSION
    model = tiny_llava(seed=0)
    dpn.apply_pyramid(model, config)
    assert_outputs(model, None, "pdrop")
    assert dpn.presets.pdrop(model).strategy.ranking == "next_layer"  # new pyramids rank as the reference


def test_a_registered_strategy_migrates_its_own_part_of_an_old_file(tmp_path, monkeypatch):
    """The config module names no strategy: an old file's strategy part is upgraded by the
    strategy's own ``upgrade`` (here a strategy registered outside dpn, which renamed a field)."""
    from dataclasses import dataclass

    from dpn.strategies.base import StrategyEntry, _STRATEGIES
    from dpn.strategies.static import StaticConfig, StaticPooling

    seen = []

    @dataclass
    class RenamedStatic(StaticConfig):
        name = "renamed_static"

        @classmethod
        def upgrade(cls, data, version):
            seen.append(version)
            data = dict(data)
            if "window_function" in data:
                data["pooling"] = data.pop("window_function")
            return data

    monkeypatch.setitem(_STRATEGIES, "renamed_static", StrategyEntry("renamed_static", RenamedStatic, StaticPooling))
    saved = dpn.PyramidConfig(stages=[{"layer": 1, "experts": [(2, 2)]}], strategy=RenamedStatic()).to_dict()
    saved["strategy"].pop("pooling")
    saved["strategy"]["window_function"] = "avg"
    saved["version"] = 2
    (tmp_path / "pyramid_config.json").write_text(json.dumps(saved))
    config = dpn.PyramidConfig.load(tmp_path)
    assert seen == [2] and config.strategy.pooling == "avg" and config.version == CONFIG_VERSION
    saved["version"] = CONFIG_VERSION  # a current file is not upgraded
    (tmp_path / "pyramid_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="window_function"):
        dpn.PyramidConfig.load(tmp_path)
    assert seen == [2]
