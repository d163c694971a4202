"""The dpn command line."""

from __future__ import annotations

import json

import pytest

import dpn
from dpn.lab.cli import main
from dpn.flops import path_flops
from dpn.lab.families.architectures import model_config
from dpn.config import PyramidConfig
from dpn.flops import decoder_flops


def test_flops_json_on_llava_7b_geometry(capsys):
    assert main(["flops", "--preset", "llava-1.5-7b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["grid"] == [24, 24] and report["stage_layers"] == [7, 15, 23]
    assert len(report["paths"]) == 27
    keep_all = next(p for p in report["paths"] if p["experts"] == ["1x1"] * 3)
    strongest = next(p for p in report["paths"] if p["experts"] == ["2x2"] * 3)
    assert keep_all["ratio"] == pytest.approx(1.0)
    assert strongest["visual_tokens"] == [576, 144, 36, 9]
    # Recompute the strongest path by hand: 64 text tokens, 576 visual tokens for 8 layers, 144 for 8, ...
    text = model_config("llava-1.5-7b").text_config
    layers = [64 + 576] * 8 + [64 + 144] * 8 + [64 + 36] * 8 + [64 + 9] * 8
    assert strongest["ratio"] == pytest.approx(decoder_flops(text, layers) / decoder_flops(text, [640] * 32))


def test_flops_table_and_trace_on_tiny(capsys):
    assert main(["flops", "--preset", "tiny", "--trace"]) == 0
    out = capsys.readouterr().out
    assert "LLM prefill FLOPs per routing path" in out and "tokens per decoder layer" in out


def test_version_names_dpn_torch_and_transformers(capsys):
    import torch
    import transformers

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == (f"dpn {dpn.__version__} (torch {torch.__version__}, "
                                               f"transformers {transformers.__version__})")


def test_a_zero_stride_is_exit_2_with_a_message(capsys):
    assert main(["flops", "--preset", "tiny", "--pyramid", "static:0x2"]) == 2
    assert "static:0x2" in capsys.readouterr().err


def test_trace_refuses_a_shape_that_does_not_fit_in_memory():
    from dpn.lab.commands.flops import check_trace_fits, trace_memory_bytes

    weights = trace_memory_bytes(model_config("llava-1.5-7b"))  # counted on the meta device: nothing allocated
    assert 7.0e9 * 4 < weights < 7.2e9 * 4  # LLaVA-1.5-7B: about 7.06B parameters, float32
    with pytest.raises(ValueError, match="llava-1.5-7b.*GiB.*available"):
        check_trace_fits("llava-1.5-7b", weights, available=24 * 2**30)
    check_trace_fits("llava-1.5-7b", weights, available=64 * 2**30)
    check_trace_fits("llava-1.5-7b", weights, available=None)  # unknown: the forward is tried


def test_flops_with_a_user_pyramid_file(tmp_path, capsys):
    PyramidConfig(stages=[{"layer": 3, "experts": [(1, 1), (4, 4)]}]).save(tmp_path)
    assert main(["flops", "--preset", "llava-1.5-13b", "--pyramid", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["visual_tokens"] for p in report["paths"]] == [[576, 576], [576, 36]]


def test_path_flops_agree_with_each_path():
    config = model_config("qwen2-0.5b")
    rows = path_flops(config, dpn.presets.paper(config), text_tokens=10)
    assert all(0 < r["ratio"] <= 1 for r in rows)
    assert sorted(r["ratio"] for r in rows)[-1] == pytest.approx(1.0)


def test_bad_pyramid_file_is_a_clear_cli_error(tmp_path, capsys):
    PyramidConfig(stages=[{"layer": 3, "experts": [(5, 5)]}]).save(tmp_path)
    assert main(["flops", "--preset", "llava-1.5-7b", "--pyramid", str(tmp_path)]) == 2
    assert "does not divide the 24x24" in capsys.readouterr().err


@pytest.mark.parametrize("spec, visual, layers", [("fastv:0.5", [576, 288], [1]),
                                                  ("pdrop:0.5", [576, 288, 144, 72], [7, 15, 23]),
                                                  ("projector:2x2", [576, 144], [-1])])
def test_flops_of_peer_strategies(spec, visual, layers, tmp_path, capsys):
    config = model_config("llava-1.5-7b")
    path = dpn.presets.from_spec(spec, config).save(tmp_path / "peer.json")
    assert main(["flops", "--preset", "llava-1.5-7b", "--pyramid", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stage_layers"] == layers and len(report["paths"]) == 1
    (row,) = report["paths"]
    assert row["visual_tokens"] == visual
    per_layer = [64 + visual[sum(layer < i for layer in layers)] for i in range(32)]
    assert row["ratio"] == pytest.approx(decoder_flops(config.text_config, per_layer)
                                         / decoder_flops(config.text_config, [64 + 576] * 32))


def test_flops_of_the_new_family_presets(capsys):
    """LLaVA-NeXT 672x672: a 24x24 base grid and a 48x48 grid whose rows end in newlines; pooled rows
    keep one newline each. Qwen2.5-VL 1024x1024: resized to 980x980, a 35x35 grid (2x2 leaves a remainder)."""
    assert main(["flops", "--preset", "llava-next-7b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["grid"] == [[24, 24], [48, 48]] and report["stage_layers"] == [7, 15, 23]
    strongest = next(p for p in report["paths"] if p["experts"] == ["2x2"] * 3)
    assert strongest["visual_tokens"] == [576 + 2304, 144 + 576, 36 + 144, 9 + 36]
    text = model_config("llava-next-7b").text_config
    segments = [64 + 2880 + 48, 64 + 720 + 24, 64 + 180 + 12, 64 + 45 + 6]  # text + visual + newlines
    layers = [segments[0]] * 8 + [segments[1]] * 8 + [segments[2]] * 8 + [segments[3]] * 8
    assert strongest["ratio"] == pytest.approx(decoder_flops(text, layers) / decoder_flops(text, [segments[0]] * 32))
    assert main(["flops", "--preset", "qwen2.5-vl-7b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["grid"] == [35, 35]
    assert next(p for p in report["paths"] if p["experts"] == ["2x2"] * 3)["visual_tokens"] == [1225, 324, 81, 25]
