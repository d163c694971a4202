"""`dpn bench` smoke run: output structure and theoretical ratios that agree with dpn.flops. No timing asserts."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dpn
from dpn.lab.families.architectures import model_config
from dpn.lab.bench import BenchOptions, report_markdown, run_bench, update_markdown_page
from dpn.lab.cli import main
from dpn.flops import path_flops, vision_flops


@pytest.fixture(scope="module")
def report():
    options = BenchOptions(presets=["tiny"], batch_sizes=[2], repeats=2, warmup=0, decode_tokens=2, text_tokens=16,
                           strategies=["fastv:0.5", "dart:0.5"])
    return run_bench(options)


def test_rows_cover_every_routing_with_positive_measurements(report):
    assert report["device"] and report["dtype"] == "float32"
    assert [r["routing"] for r in report["rows"]] == ["weakest", "mixed", "strongest", "fastv:0.5", "dart:0.5"]
    for row in report["rows"]:
        for key in ("prefill_ms", "vanilla_prefill_ms", "decode_tokens_per_s", "train_step_ms"):
            assert row[key] > 0
        assert row["efficiency"] == pytest.approx(row["measured_speedup"] / row["theoretical_speedup"])
        for key in ("overhead_prefill_ms", "overhead_decode_step_us"):  # a difference: either sign, finite
            assert math.isfinite(row[key])
        assert row["overhead_prefill_share"] == pytest.approx(row["overhead_prefill_ms"] / row["vanilla_prefill_ms"])


def test_kv_cache_columns_follow_the_kept_tokens(report):
    config = model_config("tiny")
    text = config.text_config
    per_token_mib = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4 / 2**20
    weakest, _, strongest, fastv, _ = report["rows"]
    prompt = 16 + 144  # text tokens + one image, the bench's prompt
    layers = text.num_hidden_layers
    for row in report["rows"]:  # without the pyramid every layer caches the whole prompt
        assert row["vanilla_kv_cache_mib_per_sequence"] == pytest.approx(layers * prompt * per_token_mib, rel=1e-6)
        assert row["vanilla_kv_cache_mib_after_decode"] == pytest.approx(layers * (prompt + 2) * per_token_mib, rel=1e-6)
        assert row["end_to_end_speedup"] > 0
    assert weakest["kv_cache_mib_per_sequence"] == pytest.approx(weakest["vanilla_kv_cache_mib_per_sequence"])
    # strongest: the layers after each stage cache 36, then 9 visual tokens (both samples alike: no padding)
    stages = [s.layer for s in dpn.presets.paper(config).stages]
    tokens = [16 + [144, 36, 9][sum(layer > s for s in stages)] for layer in range(layers)]
    assert strongest["kv_cache_mib_per_sequence"] == pytest.approx(sum(tokens) * per_token_mib, rel=1e-6)
    budget = BenchOptions().kv_budget_gib * 2**10
    assert strongest["decode_batch_in_budget"] == int(budget // ((sum(tokens) + 2 * layers) * per_token_mib))
    assert strongest["decode_batch_in_budget"] > strongest["vanilla_decode_batch_in_budget"]
    assert fastv["kv_cache_mib_per_sequence"] < fastv["vanilla_kv_cache_mib_per_sequence"]


def test_theoretical_speedups_agree_with_dpn_flops(report):
    config = model_config("tiny")
    paths = {tuple(r["experts"]): r for r in path_flops(config, dpn.presets.paper(config), text_tokens=16)}
    weakest, _, strongest, fastv, dart = report["rows"]
    for row, spec in ((fastv, "fastv:0.5"), (dart, "dart:0.5")):
        path = path_flops(config, dpn.presets.from_spec(spec, config), text_tokens=16)[0]
        assert row["flops_ratio"] == pytest.approx(path["ratio"]) and row["visual_tokens"] == [144, 72]
    assert weakest["theoretical_speedup"] == pytest.approx(1.0)
    assert strongest["flops_ratio"] == pytest.approx(paths[("2x2", "2x2")]["ratio"])
    vanilla_llm = paths[("1x1", "1x1")]["llm_gflops"] * 1e9
    vision = vision_flops(config.vision_config, config.text_config.hidden_size)
    expected = (vision + vanilla_llm) / (vision + strongest["flops_ratio"] * vanilla_llm)
    assert strongest["theoretical_speedup"] == pytest.approx(expected)
    assert strongest["visual_tokens"] == [144, 36, 9]


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["bench", "--preset", "tiny", "--batch-size", "1", "--routing", "strongest", "--repeats", "1",
            "--warmup", "0", "--decode-tokens", "1", "--text-tokens", "8", "--no-train-step",
            "--json", str(out_json), "--markdown", str(out_md)]
    assert main(args) == 0
    report = json.loads(out_json.read_text())
    assert len(report["rows"]) == 1 and report["rows"][0]["train_step_ms"] is None
    page = out_md.read_text()
    assert page.startswith("# Benchmarks") and report_markdown(report) in page and "| tiny | 1 | strongest |" in page
    # A second machine's section is added beside, the same machine's is replaced.
    other = {**report, "device": "NVIDIA H100"}
    update_markdown_page(out_md, other, "dpn bench", "2026-01-01")
    update_markdown_page(out_md, report, "dpn bench", "2026-01-02")
    page = out_md.read_text()
    assert page.count("NVIDIA H100, float32") == 1 and page.count(f"## tiny: {report['device']}") == 1
    assert "2026-01-02" in page and "by `dpn bench`" in page
    # another preset on the same machine gets a section of its own
    update_markdown_page(out_md, {**report, "options": {**report["options"], "presets": ["qwen2-0.5b"]}},
                         "dpn bench --preset qwen2-0.5b", "2026-01-03")
    page = out_md.read_text()
    assert page.count(f"## tiny: {report['device']}") == 1 and page.count(f"## qwen2-0.5b: {report['device']}") == 1


def test_json_is_written_row_by_row_and_train_step_out_of_memory_is_reported(tmp_path, monkeypatch):
    import dpn.lab.bench as bench

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench, "_train_step", out_of_memory)
    out_json = tmp_path / "bench.json"
    options = BenchOptions(presets=["tiny"], batch_sizes=[1], routings=["weakest", "strongest"], repeats=1, warmup=0,
                           decode_tokens=1, text_tokens=8, progress=False)
    report = run_bench(options, json_path=out_json)
    assert json.loads(out_json.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    assert [r["routing"] for r in report["rows"]] == ["weakest", "strongest"]
    for row in report["rows"]:
        assert row["train_step_ms"] is None and row["train_note"] == "out of memory" and row["prefill_ms"] > 0
    assert "| out of memory |" in report_markdown(report)


def test_a_bad_strategy_spec_fails_before_any_timing(monkeypatch):
    import dpn.lab.bench as bench

    monkeypatch.setattr(bench, "bench_preset", lambda *a, **k: pytest.fail("timed before checking the specs"))
    with pytest.raises(ValueError):
        run_bench(BenchOptions(presets=["tiny"], strategies=["fastv:nonsense"], progress=False))


def test_a_family_with_per_image_grids_is_benchmarked():
    """Qwen2.5-VL: the batch carries patchified pixels and grids; the vision tower's FLOPs are counted."""
    report = run_bench(BenchOptions(presets=["tiny-qwen2.5-vl"], batch_sizes=[1], routings=["strongest"], repeats=1,
                                    warmup=0, decode_tokens=2, text_tokens=16, train_step=False, progress=False))
    (row,) = report["rows"]
    assert row["visual_tokens"] == [48, 12, 12, 12]  # 8x6 -> 2x2 -> 4x3; then below min_tokens_to_pool
    assert 1 < row["theoretical_speedup"] < 1 / row["flops_ratio"]  # the vision tower counts on both sides
    assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0
