"""The ``dpn`` command line.

``dpn flops --preset llava-1.5-7b`` prints, for every routing path of the paper's schedule on a
real geometry (config values written in code, no download), the visual tokens left after each
stage and the LLM prefill FLOPs relative to the vanilla model. ``--trace`` also runs one forward
of that geometry with random weights and prints how many tokens each decoder layer processed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dpn.lab.architectures import ARCHITECTURES, llava_config
from dpn.lab.bench import ROUTINGS
from dpn.config import PROBABILITY_SCALES, SPEC_HELP, PyramidConfig
from dpn.flops import GIGA, decoder_flops, path_flops, vision_flops
from dpn.models import get_adapter

DEFAULT_TEXT_TOKENS = 64  # a typical LLaVA-1.5 prompt around one image


def _flops_command(args: argparse.Namespace) -> int:
    console = Console()
    model_config = llava_config(args.preset)
    pyramid = PyramidConfig.load(args.pyramid) if args.pyramid else PyramidConfig.paper_default(model_config)
    adapter = get_adapter(model_config)
    pyramid.validate_for(adapter.num_layers(model_config), adapter.visual_grid(model_config))
    rows = path_flops(model_config, pyramid, args.text_tokens)
    text_config = adapter.text_config(model_config)
    grid = adapter.visual_grid(model_config)
    vanilla_tokens = args.text_tokens + grid[0] * grid[1]
    vanilla = decoder_flops(text_config, [vanilla_tokens] * adapter.num_layers(model_config))
    vision = vision_flops(model_config.vision_config, text_config.hidden_size)
    if args.json:
        print(json.dumps({
            "preset": args.preset, "text_tokens": args.text_tokens, "grid": list(grid),
            "stage_layers": [s.layer for s in pyramid.stages], "vanilla_llm_gflops": vanilla / GIGA,
            "vision_gflops": vision / GIGA, "paths": rows,
        }, indent=2))
        return 0
    console.print(
        f"[bold]{args.preset}[/]: {adapter.num_layers(model_config)} layers, d={text_config.hidden_size}, "
        f"{grid[0]}x{grid[1]} = {grid[0] * grid[1]} visual tokens + {args.text_tokens} text tokens, "
        f"stages after layers {[s.layer for s in pyramid.stages]} (0-indexed)"
    )
    console.print(
        f"vanilla LLM prefill: {vanilla / GIGA:.1f} GFLOPs; vision tower + projector: {vision / GIGA:.1f} GFLOPs "
        "(unchanged by the pyramid). FLOPs count matmuls, dense attention (see dpn.flops); visual tokens "
        "are per segment: before stage 0, then after each stage."
    )
    table = Table(title="LLM prefill FLOPs per routing path")
    for i in range(len(pyramid.stages)):
        table.add_column(f"stage {i}", justify="center")
    table.add_column("visual tokens", justify="right")
    table.add_column("LLM GFLOPs", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("saving", justify="right")
    for row in rows:
        table.add_row(
            *row["experts"], " ".join(map(str, row["visual_tokens"])), f"{row['llm_gflops']:.1f}",
            f"{row['ratio']:.3f}", f"{1 - row['ratio']:.1%}",
        )
    console.print(table)
    if args.trace:
        _trace(console, model_config, pyramid, args.text_tokens)
    return 0


def _trace(console: Console, model_config, pyramid: PyramidConfig, text_tokens: int) -> None:
    """Run one forward with random weights and print the tokens each decoder layer processed."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from dpn.api import apply_pyramid

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(model_config).eval()
    apply_pyramid(model, pyramid)
    adapter = get_adapter(model_config)
    grid = adapter.visual_grid(model_config)
    vocab = adapter.text_config(model_config).vocab_size
    image_token = adapter.image_token_id(model_config)
    before = text_tokens // 2
    text = torch.randint(0, vocab, (text_tokens,))
    text[text == image_token] = 0
    ids = torch.cat([text[:before], torch.full((grid[0] * grid[1],), image_token), text[before:]])[None]
    size = model_config.vision_config.image_size
    experts = 0 if pyramid.selects_tokens else max(len(s.experts) for s in pyramid.stages)
    paths = {"as configured (random weights)": None, **{f"all expert {i}": i for i in range(experts)}}
    table = Table(title="tokens per decoder layer, one forward (text + visual)")
    table.add_column("routing")
    table.add_column("experts")
    table.add_column("tokens per layer")
    table.add_column("FLOPs ratio", justify="right")
    for name, forced in paths.items():
        if forced is not None:
            forced = [min(forced, len(s.experts) - 1) for s in pyramid.stages]
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


def _train_command(args: argparse.Namespace) -> int:
    from dpn.lab.train import TrainOptions, train

    options = TrainOptions(
        data=args.data, output_dir=args.output, image_folder=args.image_folder, pyramid=args.pyramid,
        init_from=args.init_from, freeze_vision=args.freeze_vision, max_steps=args.steps,
        batch_size=args.batch_size, gradient_accumulation=args.grad_accum, learning_rate=args.lr,
        router_learning_rate=args.router_lr, warmup_steps=args.warmup_steps, save_steps=args.save_steps,
        logging_steps=args.logging_steps, seed=args.seed, max_length=args.max_length, limit=args.limit,
    )
    out = train(options)
    print(f"model written to {out}")
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    from dpn.lab.evaluate import EvalOptions, evaluate

    summary = evaluate(EvalOptions(
        model=args.model, data=args.data, output_dir=args.output, image_folder=args.image_folder,
        pyramid=args.pyramid, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
        router_bias=args.router_bias, budget=args.budget, calibration_data=args.calibration_data,
        calibration_samples=args.calibration_samples, probability_scale=args.probability_scale,
        measure_latency=not args.no_latency,
    ))
    console = Console()
    table = Table(title=f"{args.model} on {args.data}")
    for column in ("split", "n", "accuracy", "kept visual tokens", "FLOPs ratio"):
        table.add_column(column, justify="right")
    for name, group in [("all", summary["overall"]), *summary["difficulty"].items()]:
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


def _compare_command(args: argparse.Namespace) -> int:
    from dpn.lab.compare import CompareOptions, run_compare

    command = "dpn compare " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["compare"] else "dpn compare"
    run_compare(CompareOptions(
        base=args.base, train_data=args.train_data, test_data=args.test_data, out_dir=args.out, seeds=args.seeds,
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, router_learning_rate=args.router_lr,
        train_limit=args.train_limit, test_limit=args.test_limit, fastv_ratios=args.fastv, pdrop_ratios=args.pdrop,
        static_strides=args.static, projector_strides=args.projector, dpn_budgets=args.dpn_budget,
        ablations=not args.no_ablations, markdown=args.markdown, image_dir=args.image_dir, command=command,
    ))
    return 0


def _bench_command(args: argparse.Namespace) -> int:
    from dpn.lab.bench import BenchOptions, report_table, run_bench, update_markdown_page

    options = BenchOptions(
        presets=args.preset or ["tiny"], batch_sizes=args.batch_size or [1, 16], routings=args.routing or list(ROUTINGS),
        repeats=args.repeats, warmup=args.warmup, dtype=args.dtype, attention=args.attn,
        text_tokens=args.text_tokens, decode_tokens=args.decode_tokens, train_step=not args.no_train_step,
        strategies=args.strategy or [],
    )
    report = run_bench(options, json_path=Path(args.json) if args.json else None)
    Console(width=max(Console().width, 200)).print(report_table(report))
    if args.markdown:
        command = "dpn bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "dpn bench"
        update_markdown_page(Path(args.markdown), report, command, time.strftime("%Y-%m-%d"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpn", description="Dynamic Pyramid Networks for multimodal LLMs")
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

    trainer = commands.add_parser("train", help="train or fine-tune a LLaVA model, with or without a pyramid")
    trainer.add_argument("--data", required=True, help="LLaVA-format JSON file")
    trainer.add_argument("--image-folder", help="folder the JSON's image paths are relative to (default: its folder)")
    trainer.add_argument("--output", required=True, help="output directory (resumes from its last checkpoint)")
    trainer.add_argument("--pyramid", default="paper", help=SPEC_HELP)
    trainer.add_argument("--init-from", help="checkpoint to fine-tune (default: a fresh tiny LLaVA)")
    trainer.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    trainer.add_argument("--steps", type=int, default=500, help="optimizer steps")
    trainer.add_argument("--batch-size", type=int, default=32)
    trainer.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    trainer.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (cosine schedule)")
    trainer.add_argument("--router-lr", type=float, help="learning rate of the routers (default: --lr)")
    trainer.add_argument("--warmup-steps", type=int, default=50)
    trainer.add_argument("--save-steps", type=int, default=100, help="checkpoint every N steps")
    trainer.add_argument("--logging-steps", type=int, default=10)
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument("--max-length", type=int, default=2048, help="longest tokenised sample")
    trainer.add_argument("--limit", type=int, help="use only the first N samples")
    trainer.set_defaults(handler=_train_command)

    evaluator = commands.add_parser("eval", help="accuracy and efficiency on LLaVA-format data (resumable)")
    evaluator.add_argument("--model", required=True, help="model directory (its saved pyramid is used, if any)")
    evaluator.add_argument("--data", required=True, help="LLaVA-format JSON file")
    evaluator.add_argument("--image-folder", help="folder the JSON's image paths are relative to (default: its folder)")
    evaluator.add_argument("--output", required=True, help="results directory (an interrupted run resumes)")
    evaluator.add_argument("--pyramid", default="saved", help=f"saved (the one beside the model) | {SPEC_HELP}")
    evaluator.add_argument("--batch-size", type=int, default=32)
    evaluator.add_argument("--max-new-tokens", type=int, default=8)
    evaluator.add_argument("--limit", type=int, help="evaluate only the first N samples")
    evaluator.add_argument("--budget", type=float,
                           help="DPN: calibrate the router bias so the LLM FLOPs are this fraction of vanilla's")
    evaluator.add_argument("--router-bias", type=float, help="DPN: set the router bias (> 0 compresses more)")
    evaluator.add_argument("--probability-scale", choices=PROBABILITY_SCALES,
                           help="DPN: override the saved probability_scale (train_only: no scaling at inference)")
    evaluator.add_argument("--calibration-data", help="LLaVA-format JSON for --budget (default: --data)")
    evaluator.add_argument("--calibration-samples", type=int, default=128)
    evaluator.add_argument("--no-latency", action="store_true", help="skip the prefill latency measurement")
    evaluator.set_defaults(handler=_eval_command)

    demo = commands.add_parser("demo", help="benchmark, fine-tune with/without DPN and static, evaluate, compare")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--from-scratch", action="store_true", help="train the base model here instead of the shipped one")
    demo.add_argument("--train-samples", type=int, default=4000)
    demo.add_argument("--test-samples", type=int, default=500)
    demo.add_argument("--steps", type=int, default=150, help="fine-tuning steps per variant")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo_command)

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
    compare.add_argument("--fastv", type=float, nargs="+", default=[0.75, 0.5, 0.25], help="FastV keep ratios")
    compare.add_argument("--pdrop", type=float, nargs="+", default=[0.75, 0.5, 0.25], help="PyramidDrop keep ratios")
    compare.add_argument("--static", nargs="+", default=["1x2", "2x2"], help="static strides")
    compare.add_argument("--projector", nargs="+", default=["2x2", "3x3"], help="projector-side pooling strides")
    compare.add_argument("--dpn-budget", type=float, nargs="+", default=[0.8, 0.6],
                         help="FLOPs targets for DPN's calibrated router bias")
    compare.add_argument("--no-ablations", action="store_true", help="skip the DPN ablations")
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
    bench.add_argument("--decode-tokens", type=int, default=16)
    bench.add_argument("--no-train-step", action="store_true", help="skip the forward+backward timing")
    bench.add_argument("--json", help="write the full report as JSON")
    bench.add_argument("--markdown", help="add or replace this machine's section of a markdown page (docs/BENCHMARKS.md)")
    bench.set_defaults(handler=_bench_command)
    flops = commands.add_parser("flops", help="per-stage visual tokens and LLM FLOPs of a pyramid on a real geometry")
    flops.add_argument("--preset", default="llava-1.5-7b", choices=sorted(ARCHITECTURES))
    flops.add_argument("--pyramid", help="a pyramid_config.json (default: the paper's schedule for the preset)")
    flops.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="text tokens around the image")
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
