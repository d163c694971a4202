"""``dpn flops``: visual tokens and LLM prefill FLOPs of every routing path on a real geometry.

``dpn flops --preset llava-1.5-7b`` prints, for every routing path of the paper's schedule on a
real geometry (config values written in code, no download), the visual tokens left after each
stage and the LLM prefill FLOPs relative to the vanilla model. ``--trace`` also runs one forward
of that geometry with random weights and prints how many tokens each decoder layer processed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from rich.table import Table

from dpn import presets
from dpn.config import PyramidConfig
from dpn.flops import CONVENTIONS, GIGA, path_flops, vision_flops
from dpn.lab.families.architectures import ARCHITECTURES, model_config, typical_layout
from dpn.lab.engine.console import console as lab_console
from dpn.memory import kv_cache_bytes
from dpn.models import geometry_of

NAME = "flops"
DEFAULT_TEXT_TOKENS = 64  # a typical LLaVA-1.5 prompt around one image
# FLOPs do not depend on which token the routers read; a spec that reads a router token gets this id.
COUNTED_ROUTER_TOKEN_ID = 0
# --trace needs its weights and room for one forward's activations: this factor over the weights.
TRACE_MEMORY_HEADROOM = 1.25
# The KV-cache column of dpn flops: a sequence's cache after the prefill, in this dtype.
KV_DTYPE_NAME = "bfloat16"


def add_to(commands: argparse._SubParsersAction) -> None:
    flops = commands.add_parser(NAME, help="per-stage visual tokens and LLM FLOPs of a pyramid on a real geometry")
    flops.add_argument("--preset", default="llava-1.5-7b", choices=sorted(ARCHITECTURES))
    flops.add_argument("--pyramid", help=f"{presets.spec_help()} (default: paper)")
    flops.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="text tokens around the image")
    flops.add_argument("--convention", choices=CONVENTIONS, default="dpn",
                       help="dpn: 2 FLOPs per multiply-add, the model's own MLP and heads (dpn.flops); fastv: as "
                            "FastV's paper counts (4nd^2 + 2n^2d + 2ndm per layer; use --text-tokens 36 for its table)")
    flops.add_argument("--json", action="store_true", help="print JSON instead of a table")
    flops.add_argument("--trace", action="store_true",
                       help="also run one forward with random weights (small presets) and print tokens per layer")
    flops.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
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
