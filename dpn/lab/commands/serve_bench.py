"""``dpn serve-bench``: requests/s and latency of dpn serve at fixed concurrencies."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.table import Table

from dpn.lab import serve as serve_defaults
from dpn.lab.commands.arguments import add_model, require_model
from dpn.lab.engine.console import console

NAME = "serve-bench"


def add_to(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(NAME, help="requests/s and latency of dpn serve at fixed concurrencies, with and "
                                           "without the pyramid")
    add_model(bench, help="model directory")
    bench.add_argument("--data", required=True, help="LLaVA-format JSON whose questions are sent")
    bench.add_argument("--pyramid", action="append", help="repeatable (default: saved and none)")
    bench.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    bench.add_argument("--requests", type=int, default=64, help="requests per row")
    bench.add_argument("--max-tokens", type=int, default=8)
    bench.add_argument("--batch-window-ms", type=float, default=serve_defaults.DEFAULT_BATCH_WINDOW_MS)
    bench.add_argument("--max-batch-size", type=int, default=serve_defaults.DEFAULT_MAX_BATCH_SIZE)
    bench.add_argument("--url", help="measure this OpenAI-compatible server, already running (e.g. vllm serve), "
                                     "instead of starting dpn serve; --model is then the name it serves the model under")
    bench.add_argument("--label", help="with --url: the rows' name (default: the URL)")
    bench.add_argument("--json", help="also write the rows as JSON")
    bench.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dpn.lab.serve_bench import ServeBenchOptions, run_serve_bench

    if args.url is None:
        require_model(args.model)
    elif args.pyramid:
        raise ValueError("--pyramid chooses the pyramid of the dpn serve it starts; with --url the running server decides")
    rows = run_serve_bench(ServeBenchOptions(
        model=args.model, data=args.data, pyramids=args.pyramid or ["saved", "none"],
        concurrencies=args.concurrency, requests=args.requests, max_tokens=args.max_tokens,
        batch_window_ms=args.batch_window_ms, max_batch_size=args.max_batch_size, url=args.url, label=args.label,
    ))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    served_by = args.url or "dpn serve"
    table = Table(title=f"{served_by} on {device}: {args.requests} requests of {args.max_tokens} new tokens")
    for column in ("pyramid", "concurrency", "requests/s", "p50 ms", "p95 ms", "mean batch", "FLOPs ratio"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["pyramid"], str(row["concurrency"]), f"{row['requests_per_second']:.2f}",
                      f"{row['p50_ms']:.0f}", f"{row['p95_ms']:.0f}",
                      "-" if row["mean_batch"] is None else f"{row['mean_batch']:.1f}",
                      "-" if row["flops_ratio"] is None else f"{row['flops_ratio']:.3f}")
    console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    return 0
