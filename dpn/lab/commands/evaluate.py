"""``dpn eval``: accuracy and efficiency of a model on LLaVA-format data (resumable)."""

from __future__ import annotations

import argparse

from rich.table import Table

from dpn.config import POSITION_MODES
from dpn.lab.commands.arguments import add_model, add_pyramid
from dpn.lab.engine.console import console as lab_console
from dpn.strategies.dpn import PROBABILITY_SCALES

NAME = "eval"


def add_to(commands: argparse._SubParsersAction) -> None:
    evaluator = commands.add_parser(NAME, help="accuracy and efficiency on LLaVA-format data (resumable)")
    add_model(evaluator)
    evaluator.add_argument("--data", required=True, help="LLaVA-format JSON file")
    evaluator.add_argument("--image-folder", help="folder the JSON's image paths are relative to (default: its folder)")
    evaluator.add_argument("--output", required=True, help="results directory (an interrupted run resumes)")
    add_pyramid(evaluator)
    evaluator.add_argument("--batch-size", type=int, default=32)
    evaluator.add_argument("--max-new-tokens", type=int, default=8)
    evaluator.add_argument("--limit", type=int, help="evaluate only the first N samples")
    evaluator.add_argument("--budget", type=float,
                           help="DPN: calibrate the router bias so the LLM FLOPs are this fraction of vanilla's")
    evaluator.add_argument("--router-bias", type=float, help="DPN: set the router bias (> 0 compresses more)")
    evaluator.add_argument("--probability-scale", choices=PROBABILITY_SCALES,
                           help="DPN: override the saved probability_scale (train_only: no scaling at inference)")
    evaluator.add_argument("--force-experts", type=int, nargs="+", metavar="E",
                           help="pooling pyramids: every sample takes expert E at each stage (one per stage; "
                                "-1: the router decides), e.g. --force-experts 0 2")
    evaluator.add_argument("--positions", choices=POSITION_MODES,
                           help="re-apply the pyramid with this position mode (its weights and settings kept)")
    evaluator.add_argument("--calibration-data", help="LLaVA-format JSON for --budget (default: --data)")
    evaluator.add_argument("--calibration-samples", type=int, default=128)
    evaluator.add_argument("--no-latency", action="store_true", help="skip the prefill latency measurement")
    evaluator.add_argument("--overwrite", action="store_true",
                           help="delete the results of another run in --output instead of refusing to mix them")
    evaluator.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dpn.lab.evaluate import EvalOptions, evaluate

    summary = evaluate(EvalOptions(
        model=args.model, data=args.data, output_dir=args.output, image_folder=args.image_folder,
        pyramid=args.pyramid, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
        router_bias=args.router_bias, budget=args.budget, calibration_data=args.calibration_data,
        calibration_samples=args.calibration_samples, probability_scale=args.probability_scale,
        force_experts=args.force_experts, positions=args.positions, measure_latency=not args.no_latency,
        overwrite=args.overwrite,
    ))
    console = lab_console()
    table = Table(title=f"{args.model} on {args.data}")
    for column in ("split", "n", "accuracy", "kept visual tokens", "FLOPs ratio"):
        table.add_column(column, justify="right")
    # Data without difficulty tags has one group, "all", the same as the overall row.
    groups = {k: v for k, v in summary["difficulty"].items() if list(summary["difficulty"]) != ["all"]}
    for name, group in [("all", summary["overall"]), *groups.items()]:
        visual = group.get("visual_tokens")
        table.add_row(name, str(group["n"]), f"{group['accuracy']:.1%}",
                      " -> ".join(f"{v:.1f}" for v in visual) if visual else "-",
                      f"{group['flops_ratio']:.3f}" if "flops_ratio" in group else "-")
    console.print(table)
    if "calibration" in summary:
        calibration = summary["calibration"]
        console.print(f"router bias {calibration['router_bias']:.3f} gives {calibration['flops_ratio']:.3f} x FLOPs on "
                      f"{calibration['samples']} calibration samples (target {calibration['target']})")
    if "prefill_latency_ratio" in summary:
        console.print(f"prefill latency with / without the pyramid: {summary['prefill_latency_ratio']:.2f} "
                      f"({summary['latency_device']})")
    console.print(f"results in {args.output}")
    return 0
