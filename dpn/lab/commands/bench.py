"""``dpn bench``: measured prefill, decode and training speed beside the FLOPs bound."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dpn.lab.families.architectures import ARCHITECTURES
from dpn.lab.bench import DEFAULT_DECODE_TOKENS, DEFAULT_KV_BUDGET_GIB, ROUTINGS
from dpn.lab.commands.arguments import command_line
from dpn.lab.engine.console import console

NAME = "bench"


def add_to(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(NAME, help="measured prefill/decode/training speed vs the FLOPs bound")
    bench.add_argument("--preset", action="append", choices=sorted(ARCHITECTURES), help="repeatable (default: tiny)")
    bench.add_argument("--batch-size", action="append", type=int, help="repeatable (default: 1 and 16)")
    bench.add_argument("--routing", action="append", choices=ROUTINGS, help="repeatable (default: all)")
    bench.add_argument("--strategy", action="append",
                       help="repeatable: also time a peer strategy spec (fastv:0.5, pdrop:0.5, projector:2x2, ...)")
    bench.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    bench.add_argument("--text-tokens", type=int, default=64)
    bench.add_argument("--decode-tokens", type=int, default=DEFAULT_DECODE_TOKENS,
                       help="greedy tokens per timed decode (and the generation the KV-cache figures assume)")
    bench.add_argument("--kv-budget-gib", type=float, default=DEFAULT_KV_BUDGET_GIB,
                       help="memory for the KV cache when computing the largest decoding batch")
    bench.add_argument("--no-train-step", action="store_true", help="skip the forward+backward timing")
    bench.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                       help="the image of presets whose grids depend on it (default: the preset's, e.g. 1024 1024)")
    bench.add_argument("--json", help="write the full report as JSON")
    bench.add_argument("--markdown", help="add or replace this machine's section of a markdown page (docs/BENCHMARKS.md)")
    bench.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dpn.lab.bench import BenchOptions, report_table, run_bench, update_markdown_page

    options = BenchOptions(
        presets=args.preset or ["tiny"], batch_sizes=args.batch_size or [1, 16], routings=args.routing or list(ROUTINGS),
        repeats=args.repeats, warmup=args.warmup, dtype=args.dtype, attention=args.attn,
        text_tokens=args.text_tokens, decode_tokens=args.decode_tokens, train_step=not args.no_train_step,
        strategies=args.strategy or [], image_size=tuple(args.image_size) if args.image_size else None,
        kv_budget_gib=args.kv_budget_gib,
    )
    report = run_bench(options, json_path=Path(args.json) if args.json else None)
    console().print(report_table(report))
    if args.markdown:
        update_markdown_page(Path(args.markdown), report, command_line(NAME), time.strftime("%Y-%m-%d"))
    return 0
