"""``dpn bench``: measured speed next to the FLOPs bound, on real model shapes with random weights.

For an architecture preset (``dpn.lab.families.architectures``) and forced routings, it measures prefill
latency (time to first token), decode throughput and peak memory, with and without the pyramid,
and a training step (forward + backward). Each row reports the measured speedup over the vanilla
model, the theoretical speedup from ``dpn.flops`` (the FLOPs the forward actually spent), and
their ratio, the **efficiency**: 1.0 means the runtime turns every FLOP saved into time saved.
The theoretical speedup counts the vision tower and projector on both sides (prefill time includes
them and the pyramid does not change them); ``flops_ratio`` is the LLM's alone.

Timing: warm-up runs first, then the median of ``repeats`` runs; on GPU each run is bracketed by
``torch.cuda.synchronize()``. Routing is forced (random routers mean nothing): ``weakest`` (every
stage keeps all tokens: the runtime's pure overhead), ``strongest`` (every stage pools with its
last expert), ``mixed`` (each sample draws its experts uniformly, seeded: different routing per
sample in one batch). ``strategies`` adds rows for the peers (any ``PyramidConfig.from_spec``
string, e.g. ``fastv:0.5``, ``pdrop:0.5``, ``projector:2x2``), timed the same way.
"""

from __future__ import annotations

import ctypes
import json
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dpn.api import apply_pyramid, pyramid_disabled, remove_pyramid
from dpn.lab.families.architectures import image_inputs, image_size_of, model_config
from dpn import presets
from dpn.compat import output_cache
from dpn.config import PyramidConfig
from dpn.lab.engine.decoding import greedy_continue, prompt_positions
from dpn.flops import vision_flops
from dpn.memory import cache_bytes, kv_cache_bytes, largest_decoding_batch
from dpn.models import geometry_of
from dpn.lab.engine.overhead import layers_passed_through
from dpn.lab.engine.timing import paired_medians, prefill_forward, sync

ROUTINGS = ("weakest", "mixed", "strongest")
DEFAULT_TEXT_TOKENS = 64
DEFAULT_DECODE_TOKENS = 16
# KV-cache memory the "decode batch" column fills: an 80 GB GPU's share after a 7B model's weights.
DEFAULT_KV_BUDGET_GIB = 40.0
# Paired runs behind the runtime-overhead columns, at least (see ``dpn.lab.engine.overhead``).
OVERHEAD_MIN_REPEATS = 10


@dataclass
class BenchOptions:
    presets: list[str] = field(default_factory=lambda: ["tiny"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    routings: list[str] = field(default_factory=lambda: list(ROUTINGS))
    repeats: int = 10
    warmup: int = 2
    dtype: str = "float32"
    attention: str = "sdpa"
    text_tokens: int = DEFAULT_TEXT_TOKENS
    decode_tokens: int = DEFAULT_DECODE_TOKENS
    train_step: bool = True
    strategies: list[str] = field(default_factory=list)
    image_size: tuple[int, int] | None = None  # (height, width); default: the preset's typical image
    kv_budget_gib: float = DEFAULT_KV_BUDGET_GIB
    seed: int = 0
    progress: bool = True


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # give freed heap back to the OS, then reset the peak resident set size (Linux: VmHWM)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_of(run, device: torch.device) -> float | None:
    _reset_peak_memory(device)
    run()
    return _peak_memory_mib(device)


def _peak_memory_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def build_model(preset: str, dtype: torch.dtype, attention: str, device: torch.device):
    """The preset with random weights, created on ``device`` in ``dtype`` (a 13B shape initialised on
    the CPU in float32 first would take minutes and 52 GB)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(model_config(preset), dtype=dtype, attn_implementation=attention)
    return model.eval()


def make_batch(model, batch_size: int, text_tokens: int, device: torch.device, dtype: torch.dtype, seed: int,
               image_size: tuple[int, int] | None = None):
    """One image per sample (of ``image_size`` for families whose grids depend on it) between two
    halves of random text, no padding."""
    geometry = geometry_of(model)
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, geometry.text_config.vocab_size, (batch_size, text_tokens), generator=generator)
    image_tokens, inputs = image_inputs(model.config, image_size, batch_size, generator)
    text[torch.isin(text, torch.tensor(sorted(set(image_tokens))))] = 0
    half = text_tokens // 2
    images = torch.tensor(image_tokens).expand(batch_size, -1)
    input_ids = torch.cat([text[:, :half], images, text[:, half:]], dim=1)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **inputs}
    if "image_grid_thw" in inputs:  # Qwen2-VL: which tokens are image tokens, as its processor says
        batch["mm_token_type_ids"] = (input_ids == model.config.image_token_id).int()
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


def batch_vision_flops(model, batch: dict[str, torch.Tensor], attention: str) -> float:
    """FLOPs of the vision tower and projector for the batch's images: analytic for LLaVA-1.5's
    CLIP/SigLIP towers, else counted by ``FlopCounterMode`` on one run with eager attention (the
    CPU sdpa kernel is not in its registry)."""
    if model.config.model_type == "llava":
        return batch["input_ids"].shape[0] * vision_flops(model.config.vision_config, geometry_of(model).hidden_size)
    from torch.utils.flop_counter import FlopCounterMode

    images = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    pixels = images.pop("pixel_values")
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.model.get_image_features(pixels, *images.values())
    finally:
        model.set_attn_implementation(attention)
    return float(counter.get_total_flops())


def forced_experts(pyramid: PyramidConfig, routing: str, batch_size: int, seed: int) -> torch.Tensor:
    stages = pyramid.stages
    if routing == "weakest":
        return torch.zeros(batch_size, len(stages), dtype=torch.long)
    if routing == "strongest":
        return torch.tensor([[len(s.experts) - 1 for s in stages]] * batch_size)
    if routing == "mixed":
        generator = torch.Generator().manual_seed(seed)
        return torch.stack([torch.randint(0, len(s.experts), (batch_size,), generator=generator) for s in stages], 1)
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")


def _decode_seconds(model, batch, steps: int, **kwargs) -> float:
    """Seconds for ``steps`` greedy decoding steps after an untimed prefill."""
    with torch.no_grad():
        positions = prompt_positions(model, batch)
        prefilled = model(**batch, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs)
        device = prefilled.logits.device
        sync(device)
        start = time.perf_counter()
        greedy_continue(model, prefilled, batch["attention_mask"], positions, steps + 1)  # the first token: the prefill's
        sync(device)
        return time.perf_counter() - start


def _train_step(model, batch, labels, **kwargs) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch, labels=labels, use_cache=False, **kwargs).loss.backward()


def bench_preset(preset: str, options: BenchOptions, device: torch.device) -> Iterator[dict[str, Any]]:
    """Measure every batch size and case of ``preset``, yielding each row as it is ready."""
    dtype = getattr(torch, options.dtype)
    model = build_model(preset, dtype, options.attention, device)
    paper = presets.paper(model.config, sample_in_training=False)
    cases = [(routing, paper, routing) for routing in options.routings]
    cases += [(spec, presets.from_spec(spec, model.config), None) for spec in options.strategies]
    for batch_size in options.batch_sizes:
        batch = make_batch(model, batch_size, options.text_tokens, device, dtype, options.seed,
                           options.image_size or image_size_of(preset))
        labels = batch["input_ids"].clone()
        labels[:, : -max(1, labels.shape[1] // 8)] = -100
        vision = batch_vision_flops(model, batch, options.attention)
        vanilla_memory = _peak_memory_of(lambda: prefill_forward(model, batch), device)
        for name, pyramid, routing in cases:
            apply_pyramid(model, pyramid)
            forced = None if routing is None else forced_experts(pyramid, routing, batch_size, options.seed)
            yield {"preset": preset, "batch_size": batch_size, "routing": name,
                   **_measure(model, batch, labels, forced, vision, vanilla_memory, options, device)}
            remove_pyramid(model)
    del model


def _measure(model, batch, labels, forced, vision: float, vanilla_memory, options: BenchOptions, device) -> dict:
    """Paired timings of ``model`` (with its pyramid, ``forced`` routing) against itself without it."""
    timing = dict(repeats=options.repeats, warmup=options.warmup, device=device)
    batch_size = batch["input_ids"].shape[0]
    with torch.no_grad():
        record = model(**batch, use_cache=False, logits_to_keep=1, force_experts=forced).routing
    # Prefill time includes the vision tower, which the pyramid leaves alone: count it on both sides.
    theoretical = float((vision + record.vanilla_flops.sum()) / (vision + record.flops.sum()))
    vanilla_prefill, prefill = paired_medians(
        lambda: _vanilla(prefill_forward, model, batch), lambda: prefill_forward(model, batch, force_experts=forced),
        **timing,
    )
    memory = _peak_memory_of(lambda: prefill_forward(model, batch, force_experts=forced), device)
    steps = options.decode_tokens
    vanilla_decode, decode = paired_medians(
        lambda: _vanilla(_decode_seconds, model, batch, steps),
        lambda: _decode_seconds(model, batch, steps, force_experts=forced), **timing,
    )
    kv = _kv_cache(model, batch, forced, record, steps, options.kv_budget_gib)
    # The overhead is a small difference of cheap runs (no layers): more of them than the other columns.
    overhead = runtime_overhead(model, batch, forced, steps, **{**timing, "repeats": max(options.repeats,
                                                                                        OVERHEAD_MIN_REPEATS)})
    vanilla_train = train = train_note = None
    if options.train_step:
        model.train()
        try:
            vanilla_train, train = paired_medians(
                lambda: _vanilla(_train_step, model, batch, labels),
                lambda: _train_step(model, batch, labels, force_experts=forced), **timing,
            )
        except torch.cuda.OutOfMemoryError:
            # Full fine-tuning of a large shape may not fit beside its gradients; the inference rows still stand.
            train_note = "out of memory"
        model.zero_grad(set_to_none=True)
        model.eval()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    measured = vanilla_prefill / prefill
    return {
        "visual_tokens": record.visual_tokens.float().mean(0).tolist(),
        "flops_ratio": float(record.flops.sum() / record.vanilla_flops.sum()),
        "prefill_ms": prefill * 1e3, "vanilla_prefill_ms": vanilla_prefill * 1e3,
        "measured_speedup": measured, "theoretical_speedup": theoretical,
        "efficiency": measured / theoretical,
        "decode_tokens_per_s": batch_size * steps / decode,
        "vanilla_decode_tokens_per_s": batch_size * steps / vanilla_decode,
        "end_to_end_speedup": (vanilla_prefill + vanilla_decode) / (prefill + decode),
        **kv,
        "overhead_prefill_ms": overhead["overhead_prefill_ms"],
        "overhead_prefill_share": overhead["overhead_prefill_ms"] / (vanilla_prefill * 1e3),
        "overhead_decode_step_us": overhead["overhead_decode_step_us"],
        "overhead_decode_share": overhead["overhead_decode_step_us"] / (vanilla_decode / steps * 1e6),
        "peak_memory_mib": memory, "vanilla_peak_memory_mib": vanilla_memory,
        "train_step_ms": None if train is None else train * 1e3,
        "vanilla_train_step_ms": None if vanilla_train is None else vanilla_train * 1e3,
        "train_speedup": None if train is None else vanilla_train / train,
        "train_note": train_note,
    }


def _kv_cache(model, batch, forced, record, steps: int, budget_gib: float) -> dict[str, float]:
    """KV-cache bytes per sequence with and without the pyramid: measured after the prefill (what the
    caches hold, batch padding included) and computed after ``steps`` new tokens (each sample's own
    layout), with the largest decoding batch whose caches fit ``budget_gib``."""
    with torch.no_grad():
        pooled = cache_bytes(output_cache(model(**batch, use_cache=True, logits_to_keep=1, force_experts=forced)))
        with pyramid_disabled(model):
            vanilla = cache_bytes(output_cache(model(**batch, use_cache=True, logits_to_keep=1)))
    text_config = geometry_of(model.config).text_config
    dtype = next(model.parameters()).dtype
    batch_size = batch["input_ids"].shape[0]
    prompt = batch["attention_mask"].sum(1, keepdim=True).expand(-1, record.layer_tokens.shape[1])
    after = float(kv_cache_bytes(text_config, record.layer_tokens, dtype, steps).mean())
    vanilla_after = float(kv_cache_bytes(text_config, prompt, dtype, steps).mean())
    budget = budget_gib * 2**30
    return {
        "kv_cache_mib_per_sequence": pooled / batch_size / 2**20,
        "vanilla_kv_cache_mib_per_sequence": vanilla / batch_size / 2**20,
        "kv_cache_mib_after_decode": after / 2**20, "vanilla_kv_cache_mib_after_decode": vanilla_after / 2**20,
        "decode_batch_in_budget": largest_decoding_batch(after, budget),
        "vanilla_decode_batch_in_budget": largest_decoding_batch(vanilla_after, budget),
    }


def runtime_overhead(model, batch, forced, steps: int, repeats: int, warmup: int,
                     device: torch.device) -> dict[str, float]:
    """Milliseconds per prefill and microseconds per decoding step that the pyramid on ``model``
    (``forced`` routing) adds to the work around the layers: the same paired runs as the other
    columns, with every decoder layer passed through (``dpn.lab.engine.overhead``)."""
    timing = dict(repeats=repeats, warmup=warmup, device=device)
    prefill_arguments = dict(use_cache=True, position_ids=prompt_positions(model, batch))  # as generate prefills
    with layers_passed_through(model):
        vanilla_prefill, prefill = paired_medians(
            lambda: _vanilla(prefill_forward, model, batch, **prefill_arguments),
            lambda: prefill_forward(model, batch, force_experts=forced, **prefill_arguments), **timing,
        )
        vanilla_decode, decode = paired_medians(
            lambda: _vanilla(_decode_seconds, model, batch, steps),
            lambda: _decode_seconds(model, batch, steps, force_experts=forced), **timing,
        )
    return {
        "overhead_prefill_ms": (prefill - vanilla_prefill) * 1e3,
        "overhead_decode_step_us": (decode - vanilla_decode) / steps * 1e6,
        "around_layers_prefill_ms": vanilla_prefill * 1e3,
        "around_layers_decode_step_us": vanilla_decode / steps * 1e6,
    }


def _vanilla(run, model, *args, **kwargs):
    """``run(model, *args, **kwargs)`` with the pyramid taken off for the call."""
    with pyramid_disabled(model):
        return run(model, *args, **kwargs)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_bench(options: BenchOptions, device: torch.device | None = None, json_path: Path | None = None) -> dict[str, Any]:
    """Measure every preset; with ``json_path`` the report is rewritten after each row, so a long run
    that stops early keeps what it measured."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unknown = set(options.routings) - set(ROUTINGS)
    if unknown:
        raise ValueError(f"unknown routings {sorted(unknown)}; choose from {ROUTINGS}")
    for spec in options.strategies:  # a typo should fail now, not after the first preset's timings
        presets.from_spec(spec, model_config(options.presets[0]))
    report = {
        "device": device_description(device), "torch": torch.__version__, "dtype": options.dtype,
        "attention": options.attention, "options": asdict(options), "rows": [],
    }
    total = len(options.presets) * len(options.batch_sizes) * (len(options.routings) + len(options.strategies))
    with tqdm(total=total, desc="dpn bench", unit="row", disable=not options.progress) as bar:
        for preset in options.presets:
            for row in bench_preset(preset, options, device):
                report["rows"].append(row)
                if json_path is not None:
                    json_path.write_text(json.dumps(report, indent=1))
                bar.set_postfix_str(f"{preset} batch {row['batch_size']} {row['routing']}: "
                                    f"efficiency {row['efficiency']:.2f}")
                bar.update()
    return report


def _rate(value: float) -> str:
    """Three significant digits up to 100, whole numbers above (5.06, 47.3, 1632)."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _overhead_cell(row: dict[str, Any]) -> str:
    if "overhead_prefill_ms" not in row:  # a report from before the column
        return "-"
    return (f"{row['overhead_prefill_ms']:+.2f} ({100 * row['overhead_prefill_share']:+.1f}%), "
            f"{row['overhead_decode_step_us']:+.0f} ({100 * row['overhead_decode_share']:+.1f}%)")


COLUMNS = (
    ("preset", lambda r: r["preset"]),
    ("batch", lambda r: str(r["batch_size"])),
    ("routing", lambda r: r["routing"]),
    ("visual tokens", lambda r: " ".join(f"{v:.0f}" for v in r["visual_tokens"])),
    ("FLOPs ratio", lambda r: f"{r['flops_ratio']:.3f}"),
    ("prefill ms (vanilla)", lambda r: f"{r['prefill_ms']:.1f} ({r['vanilla_prefill_ms']:.1f})"),
    ("speedup measured", lambda r: f"{r['measured_speedup']:.2f}x"),
    ("speedup FLOPs", lambda r: f"{r['theoretical_speedup']:.2f}x"),
    ("efficiency", lambda r: f"{r['efficiency']:.2f}"),
    ("decode tok/s (vanilla)", lambda r: f"{_rate(r['decode_tokens_per_s'])} ({_rate(r['vanilla_decode_tokens_per_s'])})"),
    ("end-to-end speedup", lambda r: f"{r['end_to_end_speedup']:.2f}x" if "end_to_end_speedup" in r else "-"),
    ("KV MiB/seq (vanilla)", lambda r: f"{r['kv_cache_mib_per_sequence']:.2f} ({r['vanilla_kv_cache_mib_per_sequence']:.2f})"
     if "kv_cache_mib_per_sequence" in r else "-"),
    ("decode batch in budget (vanilla)", lambda r: f"{r['decode_batch_in_budget']} ({r['vanilla_decode_batch_in_budget']})"
     if "decode_batch_in_budget" in r else "-"),
    ("runtime overhead: prefill ms, decode µs/step (% of vanilla)", _overhead_cell),
    ("train step speedup", lambda r: f"{r['train_speedup']:.2f}x" if r["train_speedup"] is not None
     else r.get("train_note") or "-"),
    ("peak MiB (vanilla)", lambda r: "-" if r["peak_memory_mib"] is None
     else f"{r['peak_memory_mib']:.0f} ({r['vanilla_peak_memory_mib']:.0f})"),
)


def report_table(report: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"dpn bench: {report['device']}, {report['dtype']}, {report['attention']} attention")
    for name, _ in COLUMNS:
        table.add_column(name, justify="right")
    for row in report["rows"]:
        table.add_row(*(cell(row) for _, cell in COLUMNS))
    return table


def report_markdown(report: dict[str, Any]) -> str:
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row) for _, cell in COLUMNS) + " |" for row in report["rows"]]
    return "\n".join(lines) + "\n"


PAGE_HEADER = """# Benchmarks

Regenerate a section by running, on the machine it names, the command it names; e.g.

    {command}

Each section is one machine and set of presets; a command adds or replaces its own section only.
Columns: FLOPs ratio = LLM prefill FLOPs with / without the pyramid (`dpn.flops`, the FLOPs each
forward really spent); speedup measured = vanilla / pyramid prefill time (median of the timed runs,
after warm-up); speedup FLOPs = vanilla / pyramid prefill FLOPs, vision tower included on both
sides (its time is in the measurement); efficiency = measured / FLOPs speedup; decode = greedy
tokens per second over the batch after the prefill; end-to-end = vanilla / pyramid time of the
prefill plus the decoded tokens; KV MiB/seq = the cache after the prefill per sequence (measured:
what the cache holds, batch padding included); decode batch in budget = how many sequences' caches
(computed per sample, prompt + decoded tokens) fit the `--kv-budget-gib` memory (weights not
counted); runtime overhead = what the pyramid adds to the work around the layers, per prefill and
per decoding step, timed with every decoder layer passed through (`dpn/lab/engine/overhead.py`), and its
share of the vanilla model's full prefill or step; train step = forward + backward time ratio.
Routing is forced: `weakest` keeps every token (the runtime's own overhead), `strongest` pools with
the last expert at every stage, `mixed` draws each sample's experts at random (different routing
per sample in one batch). `--strategy` adds rows for the peers (`fastv:0.5`, `pdrop:0.5`,
`projector:2x2`, ...), timed the same way.
"""


def update_markdown_page(path: Path, report: dict[str, Any], command: str, date: str) -> str:
    """Write ``report`` as the section of the page at ``path`` for its machine, dtype, attention and
    presets, keeping the other sections; the section names the command that produced it."""
    presets = ", ".join(report["options"]["presets"])
    key = f"{report['device']} | {report['dtype']} | {report['attention']} | {presets}"
    start, end = f"<!-- dpn-bench: {key} -->", f"<!-- /dpn-bench: {key} -->"
    section = (
        f"{start}\n## {presets}: {report['device']}, {report['dtype']}, {report['attention']} attention\n\n"
        f"Measured {date} with torch {report['torch']} by `{command}`.\n\n{report_markdown(report)}{end}"
    )
    page = path.read_text() if path.is_file() else PAGE_HEADER.format(command=command)
    if start in page and end in page:
        before, rest = page.split(start, 1)
        page = before + section + rest.split(end, 1)[1]
    else:
        page = page.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(page)
    return page
