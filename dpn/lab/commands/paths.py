"""``dpn paths``: every routing path of a pooling pyramid, forced."""

from __future__ import annotations

import argparse

from rich.table import Table

from dpn import presets
from dpn.lab.commands.arguments import add_model
from dpn.lab.engine.console import console as lab_console

NAME = "paths"


def add_to(commands: argparse._SubParsersAction) -> None:
    paths = commands.add_parser(NAME, help="every routing path of a pooling pyramid, forced: accuracy per "
                                           "difficulty, the oracle frontier and the routers' regret")
    add_model(paths)
    paths.add_argument("--data", required=True, help="LLaVA-format JSON file")
    paths.add_argument("--output", required=True, help="results directory (each evaluation resumes)")
    paths.add_argument("--pyramid", default="saved", help=f"saved | a pooling spec: {presets.spec_help()}")
    paths.add_argument("--positions", nargs="+", default=["keep"], help="position modes: renumber and/or keep")
    paths.add_argument("--scale", nargs="+", default=["none"],
                       help="DPN: none (pooled tokens unscaled) and/or value (times the router's probability)")
    paths.add_argument("--limit", type=int, help="evaluate only the first N samples")
    paths.add_argument("--batch-size", type=int, default=32)
    paths.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dpn.lab.paths import PathsOptions, run_paths

    report = run_paths(PathsOptions(
        model=args.model, data=args.data, output_dir=args.output, pyramid=args.pyramid, positions=args.positions,
        scales=args.scale, limit=args.limit, batch_size=args.batch_size,
    ))
    console = lab_console()
    for mode in report["modes"]:
        table = Table(title=f"forced paths: {mode['mode']}")
        for column in ("path", "FLOPs ratio", "accuracy", "easy", "medium", "hard"):
            table.add_column(column, justify="right")
        for row in mode["rows"]:
            table.add_row(" ".join(map(str, row["path"])), f"{row['flops_ratio']:.3f}", f"{row['accuracy']:.1%}",
                          *(f"{row[d]:.1%}" if d in row else "-" for d in ("easy", "medium", "hard")))
        console.print(table)
        console.print("oracle frontier: " + ", ".join(f"{p['accuracy']:.1%} at {p['flops_ratio']:.3f}"
                                                      for p in mode["oracle"]))
        console.print("difficulty oracle (one path per difficulty): " + ", ".join(
            f"{p['accuracy']:.1%} at {p['flops_ratio']:.3f}" for p in mode["difficulty_oracle"]))
        if "router" in mode:
            router = mode["router"]
            console.print(f"routers: {router['accuracy']:.1%} at {router['flops_ratio']:.3f} FLOPs; regret "
                          f"{router['regret']:.1%} (against the difficulty oracle: {router['difficulty_regret']:.1%})")
    console.print(f"results in {args.output} (PATHS.md, paths.json, paths.png)")
    return 0
