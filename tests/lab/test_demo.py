"""A few-step smoke run of the whole demo pipeline: benchmark, base, fine-tunes, evaluations, table."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from dpn.lab.demo import BASE_CHECKPOINT, DemoOptions, run_demo, static_schedules


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    options = DemoOptions(
        out_dir=str(tmp_path / "demo"), from_scratch=True, train_samples=12, test_samples=6, finetune_steps=2,
        base_steps=2, base_train_samples=16, batch_size=4, progress=False,
    )
    report = run_demo(options, console=Console(file=open(tmp_path / "console.txt", "w"), width=200))
    results = report["results"]

    def named(prefix: str, suffix: str = "") -> str:
        found = [name for name in results if name.startswith(prefix) and name.endswith(suffix)]
        assert len(found) == 1, (prefix, suffix, list(results))
        return found[0]

    # Each row evaluated the model and pyramid its name says.
    strategy = {name: (summary["pyramid"] or {}).get("strategy", {}).get("name") for name, summary in results.items()}
    assert strategy["base"] is None and strategy["fine-tuned, no pyramid"] is None
    assert strategy[named("base + static", ", no training")] == "static"
    strongest = named("fine-tuned, static", "(strongest)")
    matching = next(name for name in results if name.startswith("fine-tuned, static") and name != strongest)
    assert strategy[strongest] == strategy[matching] == "static"
    assert strategy["fine-tuned, DPN"] == strategy["fine-tuned, DPN, unscaled at inference"] == "dpn"
    assert results["fine-tuned, DPN, unscaled at inference"]["inference"]["probability_scale"] == "train_only"
    assert results["fine-tuned, DPN"]["model"] == results["fine-tuned, DPN, unscaled at inference"]["model"]
    assert results["base"]["model"] == results[named("base + static")]["model"] != results["fine-tuned, DPN"]["model"]
    contrast = report["discriminativeness"]
    vanilla, strongest = results["fine-tuned, no pyramid"], results[strongest]
    assert contrast["hard_drop"] == vanilla["difficulty"]["hard"]["accuracy"] - strongest["difficulty"]["hard"]["accuracy"]
    assert contrast["easy_drop"] == vanilla["difficulty"]["easy"]["accuracy"] - strongest["difficulty"]["easy"]["accuracy"]
    dpn_summary = report["results"]["fine-tuned, DPN"]
    assert dpn_summary["overall"]["n"] == 6 and 0 < dpn_summary["overall"]["flops_ratio"] <= 1
    assert (tmp_path / "demo" / "eval" / "dpn" / "routing.png").is_file()
    table = (tmp_path / "demo" / "results.md").read_text()
    assert table.startswith("| model | accuracy |") and "fine-tuned, DPN" in table and "Discriminativeness:" in table
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["results"].keys() == report["results"].keys()


def test_static_schedules_cover_every_fixed_path():
    schedules = static_schedules(BASE_CHECKPOINT)
    assert len(schedules) == 3 ** 2 - 1  # two stages with three experts each, all-1x1 left out
    assert all(0 < ratio < 1 for _, ratio in schedules)
