"""``dpn demo``: watch DPN work on a fresh CPU machine in minutes, with the real pipeline.

1. write the synthetic fine-grained VQA benchmark (LLaVA format);
2. take the base tiny LLaVA: the shipped checkpoint (``dpn/lab/assets/tiny-llava-base``, produced by
   ``dpn train --pyramid none``; its command, seed and log sit beside it) or, with
   ``--from-scratch``, train it here;
3. fine-tune it four ways with the same data, steps and seed (the vision tower frozen, as LLaVA-1.5
   fine-tunes): without a pyramid, with the most aggressive static pyramid, with DPN (the paper's
   schedule), and with a static pyramid whose FLOPs come closest to what DPN spent;
4. evaluate all of them, plus the base model without and with the most aggressive static pooling
   (training-free), and print one table: accuracy overall / easy / hard, kept visual tokens, LLM
   FLOPs ratio and measured prefill latency ratio; then the benchmark's discriminativeness (what
   the most aggressive static pooling costs on easy and on hard questions after the same
   fine-tuning). Results and plots go to ``--out``.
"""

from __future__ import annotations

import json
import time
from itertools import product
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from transformers import LlavaConfig

from dpn import presets
from dpn.config import PyramidConfig
from dpn.lab.engine.console import console as lab_console
from dpn.lab.data.synthetic import DEFAULT_FAMILIES, generate
from dpn.lab.evaluate import EvalOptions, evaluate
from dpn.flops import path_flops
from dpn.models import geometry_of
from dpn.strategies import PoolingStage, StaticConfig
from dpn.lab.finetune import Recipe, fine_tune
from dpn.lab.train import PyramidTrainingArguments, TrainOptions, train

BASE_CHECKPOINT = Path(__file__).parent / "assets" / "tiny-llava-base"
# Text tokens of a benchmark prompt around its image (for choosing the static schedule).
PROMPT_TEXT_TOKENS = 20
# Questions per image in the base model's training conversations: every default family.
BASE_TURNS = len(DEFAULT_FAMILIES)
# The benchmark's discriminativeness goals (reported, not enforced): the vanilla model's accuracy,
# and what the most aggressive static pooling may cost on hard questions (at least) and easy ones (at most).
VANILLA_ACCURACY_GOAL = 0.90
HARD_DROP_GOAL = 0.15
EASY_DROP_LIMIT = 0.03
VANILLA = "fine-tuned, no pyramid"
# Batches of each evaluation timed with and without the pyramid (paired medians of 5 repeats each).
DEMO_LATENCY_BATCHES = 2


@dataclass
class DemoOptions:
    out_dir: str = "runs/demo"
    from_scratch: bool = False
    train_samples: int = 4000
    test_samples: int = 500
    finetune_steps: int = 150
    base_steps: int = 3000
    base_train_samples: int = 40000
    batch_size: int = 32
    learning_rate: float = 1e-4
    router_learning_rate: float = 1e-3
    seed: int = 0
    progress: bool = True


def run_demo(options: DemoOptions, console: Console | None = None) -> dict[str, Any]:
    console = console or lab_console()
    start = time.perf_counter()
    out = Path(options.out_dir)
    data = out / "data"
    if not (data / "test.json").is_file():
        console.print(f"[bold]1/4[/] writing the benchmark to {data}")
        generate(data, train=options.train_samples, val=0, test=options.test_samples, seed=options.seed,
                 progress=options.progress)
    base = _base_model(options, out, data, console)

    console.print("[bold]3/4[/] fine-tuning: no pyramid, strongest static, DPN, then static at DPN's FLOPs; "
                  "evaluating each")
    schedules = static_schedules(base)
    strongest = _schedule_file(min(schedules, key=lambda s: s[1])[0], out, "strongest")
    results: dict[str, dict[str, Any]] = {}
    results["base"] = _score(options, "base", base, "none")
    results[f"base + static {_path_name(strongest)}, no training"] = _score(options, "base-static", base, str(strongest))
    results[VANILLA] = _score(options, "vanilla", _finetune(options, base, "vanilla", "none"), "saved")
    strongest_name = f"fine-tuned, static {_path_name(strongest)} (strongest)"
    results[strongest_name] = _score(options, "static-strongest",
                                     _finetune(options, base, "static-strongest", str(strongest)), "saved")
    dpn_model = _finetune(options, base, "dpn", "paper")
    results["fine-tuned, DPN"] = _score(options, "dpn", dpn_model, "saved")
    # The same weights and routes without the paper's inference-time probability scaling.
    results["fine-tuned, DPN, unscaled at inference"] = _score(options, "dpn-train-only", dpn_model, "saved",
                                                               probability_scale="train_only")
    dpn_flops = results["fine-tuned, DPN"]["overall"]["flops_ratio"]
    matching = _schedule_file(min(schedules, key=lambda s: abs(s[1] - dpn_flops))[0], out, "matching")
    static = _finetune(options, base, "static", str(matching))
    results[f"fine-tuned, static {_path_name(matching)}"] = _score(options, "static", static, "saved")

    console.print("[bold]4/4[/] results")
    table = results_table(results)
    console.print(table)
    contrast = discriminativeness(results[VANILLA], results[strongest_name])
    console.print(discriminativeness_line(contrast))
    elapsed = time.perf_counter() - start
    report = {"elapsed_seconds": elapsed, "options": options.__dict__, "results": results,
              "discriminativeness": contrast}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(results_markdown(results, elapsed) + "\n" + discriminativeness_line(contrast) + "\n")
    console.print(f"wall time {elapsed / 60:.1f} min; routing plot: {out / 'eval' / 'dpn' / 'routing.png'}; "
                  f"table: {out / 'results.md'}")
    return report


def _finetune(options: DemoOptions, base: Path, name: str, pyramid: str) -> Path:
    """Fine-tune ``base`` with ``pyramid``: every variant gets the same data, steps and seed."""
    out = Path(options.out_dir)
    recipe = Recipe(steps=options.finetune_steps, batch_size=options.batch_size, learning_rate=options.learning_rate,
                    router_learning_rate=options.router_learning_rate, seed=options.seed,
                    train_limit=options.train_samples, freeze_vision=True, progress=options.progress)
    return fine_tune(recipe, base, out / "data" / "train.json", out / name, pyramid)


def _score(options: DemoOptions, name: str, model: Path, pyramid: str,
           probability_scale: str | None = None) -> dict[str, Any]:
    out = Path(options.out_dir)
    return evaluate(EvalOptions(
        model=str(model), data=str(out / "data" / "test.json"), output_dir=str(out / "eval" / name),
        pyramid=pyramid, batch_size=options.batch_size, probability_scale=probability_scale,
        progress=options.progress, latency_batches=DEMO_LATENCY_BATCHES,
    ))


def _base_model(options: DemoOptions, out: Path, data: Path, console: Console) -> Path:
    if not options.from_scratch:
        if not (BASE_CHECKPOINT / "model.safetensors").is_file():
            raise FileNotFoundError(f"the shipped base checkpoint is missing at {BASE_CHECKPOINT}; use --from-scratch")
        console.print(f"[bold]2/4[/] base model: the shipped checkpoint {BASE_CHECKPOINT}")
        return BASE_CHECKPOINT
    console.print(f"[bold]2/4[/] training the base model from scratch ({options.base_steps} steps)")
    base_data = out / "base-data"
    if not (base_data / "train.json").is_file():
        # Multi-turn conversations: several answers per encoded image, the dense supervision a base needs.
        generate(base_data, train=options.base_train_samples, val=0, test=0, seed=options.seed + 1,
                 turns=BASE_TURNS, progress=options.progress)
    return train(TrainOptions(
        data=str(base_data / "train.json"), pyramid="none", progress=options.progress,
    ), PyramidTrainingArguments(
        output_dir=str(out / "base"), max_steps=options.base_steps, per_device_train_batch_size=options.batch_size,
        learning_rate=5e-4, warmup_steps=50, save_steps=250, logging_steps=25, seed=options.seed,
    ))


def static_schedules(model_dir: Path) -> list[tuple[PyramidConfig, float]]:
    """Every fixed (one expert per stage) schedule over the paper's stages, with its LLM FLOPs
    ratio for a benchmark-sized prompt. The all-1x1 schedule (no pooling) is left out."""
    config = LlavaConfig.from_pretrained(model_dir)
    geometry = geometry_of(config)
    paper = presets.paper(config)
    schedules = []
    for path in product(*(stage.experts for stage in paper.stages)):
        if any(expert != (1, 1) for expert in path):
            stages = [PoolingStage(s.layer, [e]) for s, e in zip(paper.stages, path)]
            schedule = PyramidConfig(stages=stages, strategy=StaticConfig())
            schedules.append((schedule, path_flops(geometry, schedule, PROMPT_TEXT_TOKENS)[0]["ratio"]))
    return schedules


def discriminativeness(vanilla: dict[str, Any], pooled: dict[str, Any]) -> dict[str, Any]:
    """How much the benchmark separates full detail from aggressive pooling, against its goals."""
    def accuracy(summary: dict[str, Any], difficulty: str) -> float:
        return summary["difficulty"].get(difficulty, {}).get("accuracy", float("nan"))

    contrast = {
        "vanilla_accuracy": vanilla["overall"]["accuracy"],
        "hard_drop": accuracy(vanilla, "hard") - accuracy(pooled, "hard"),
        "easy_drop": accuracy(vanilla, "easy") - accuracy(pooled, "easy"),
    }
    contrast["goals_met"] = (contrast["vanilla_accuracy"] >= VANILLA_ACCURACY_GOAL
                             and contrast["hard_drop"] >= HARD_DROP_GOAL and contrast["easy_drop"] <= EASY_DROP_LIMIT)
    return contrast


def discriminativeness_line(contrast: dict[str, Any]) -> str:
    return (f"Discriminativeness: vanilla {contrast['vanilla_accuracy']:.1%} (goal >= {VANILLA_ACCURACY_GOAL:.0%}); "
            f"the strongest static pooling loses {contrast['hard_drop'] * 100:.1f} points on hard questions "
            f"(goal >= {HARD_DROP_GOAL * 100:.0f}) and {contrast['easy_drop'] * 100:.1f} on easy ones "
            f"(goal <= {EASY_DROP_LIMIT * 100:.0f}): goals {'met' if contrast['goals_met'] else 'NOT met'}.")


def _schedule_file(schedule: PyramidConfig, out: Path, name: str) -> Path:
    return schedule.save(out / "schedules" / f"{name}.json")


def _path_name(schedule_file: Path) -> str:
    stages = PyramidConfig.load(schedule_file).stages
    return "/".join("x".join(map(str, s.experts[0])) for s in stages)


COLUMNS = ("accuracy", "easy", "medium", "hard", "kept visual tokens", "FLOPs ratio", "latency ratio")


def _row(summary: dict[str, Any]) -> list[str]:
    by = summary["difficulty"]
    overall = summary["overall"]
    visual = overall.get("visual_tokens")
    return [
        f"{overall['accuracy']:.1%}",
        *(f"{by[d]['accuracy']:.1%}" if d in by else "-" for d in ("easy", "medium", "hard")),
        f"{visual[-1]:.1f} / {visual[0]:.0f}" if visual else "all",
        f"{overall['flops_ratio']:.3f}" if "flops_ratio" in overall else "1.000",
        f"{summary['prefill_latency_ratio']:.2f}" if "prefill_latency_ratio" in summary else "1.00",
    ]


def results_table(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="tiny LLaVA on the synthetic fine-grained VQA benchmark")
    table.add_column("model")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for name, summary in results.items():
        table.add_row(name, *_row(summary))
    return table


def results_markdown(results: dict[str, dict[str, Any]], elapsed: float) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_row(summary)) + " |" for name, summary in results.items()]
    hard = {name: s["difficulty"].get("hard", {}).get("visual_tokens") for name, s in results.items()}
    easy = {name: s["difficulty"].get("easy", {}).get("visual_tokens") for name, s in results.items()}
    notes = [
        "",
        "Kept visual tokens: mean after the last stage / before the first. FLOPs ratio: LLM prefill, analytic "
        "(dpn.flops). Latency ratio: measured prefill time with / without the pyramid, same batches, this machine.",
    ]
    for name in results:
        if hard[name] and easy[name]:
            notes.append(f"- {name}: kept visual tokens hard {hard[name][-1]:.1f} vs easy {easy[name][-1]:.1f} "
                         f"(ratio {hard[name][-1] / max(easy[name][-1], 1e-9):.2f})")
    notes.append(f"\nWall time: {elapsed / 60:.1f} min.")
    return "\n".join(lines + notes) + "\n"
