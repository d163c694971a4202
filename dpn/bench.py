"""``dpn bench``: measured speed next to the FLOPs bound, on real model shapes with random weights.

For an architecture preset (``dpn.architectures``) and forced routings, it measures prefill
latency (time to first token), decode throughput and peak memory, with and without the pyramid,
and a training step (forward + backward). Each row reports the measured speedup over the vanilla
model, the theoretical speedup from ``dpn.flops`` (the FLOPs the forward actually spent), and
their ratio, the **efficiency**: 1.0 means the runtime turns every FLOP saved into time saved.

Timing: warm-up runs first, then the median of ``repeats`` runs; on GPU each run is bracketed by
``torch.cuda.synchronize()``. Routing is forced (random routers mean nothing): ``weakest`` (every
stage keeps all tokens: the runtime's pure overhead), ``strongest`` (every stage pools with its
last expert), ``mixed`` (each sample draws its experts uniformly, seeded: different routing per
sample in one batch).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpn.api import apply_pyramid, pyramid_disabled
from dpn.architectures import llava_config
from dpn.config import PyramidConfig
from dpn.models import get_adapter

ROUTINGS = ("weakest", "mixed", "strongest")
DEFAULT_TEXT_TOKENS = 64
DEFAULT_DECODE_TOKENS = 16


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
    seed: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(run, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


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
    config = llava_config(preset)
    config._attn_implementation = attention
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation(attention)
    return model


def make_batch(model, batch_size: int, text_tokens: int, device: torch.device, dtype: torch.dtype, seed: int):
    """One image per sample between two halves of random text, no padding."""
    adapter = get_adapter(model)
    grid = adapter.visual_grid(model.config)
    image_token = adapter.image_token_id(model.config)
    vocab = adapter.text_config(model.config).vocab_size
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, vocab, (batch_size, text_tokens), generator=generator)
    text[text == image_token] = 0
    half = text_tokens // 2
    images = torch.full((batch_size, grid[0] * grid[1]), image_token)
    input_ids = torch.cat([text[:, :half], images, text[:, half:]], dim=1)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device=device, dtype=dtype),
    }


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


def _decode_tokens_per_second(model, batch, steps: int, repeats: int, warmup: int, device, **kwargs) -> float:
    """Greedy decoding after a (untimed) prefill: new tokens per second over the whole batch."""
    times = []
    for run in range(warmup + repeats):
        with torch.no_grad():
            out = model(**batch, use_cache=True, logits_to_keep=1, **kwargs)
            cache, mask = out.past_key_values, batch["attention_mask"]
            position = mask.sum(-1, keepdim=True)
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = model(input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache,
                            use_cache=True, logits_to_keep=1)
                position = position + 1
                cache = out.past_key_values
                token = out.logits[:, -1:].argmax(-1)
            _sync(device)
        if run >= warmup:
            times.append(time.perf_counter() - start)
    return batch["input_ids"].shape[0] * steps / statistics.median(times)


def _train_step_seconds(model, batch, repeats: int, warmup: int, device, **kwargs) -> float:
    labels = batch["input_ids"].clone()
    labels[:, : -max(1, labels.shape[1] // 8)] = -100

    def run():
        model.zero_grad(set_to_none=True)
        out = model(**batch, labels=labels, use_cache=False, **kwargs)
        out.loss.backward()

    model.train()
    try:
        return _median_seconds(run, repeats, warmup, device)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def bench_preset(preset: str, options: BenchOptions, device: torch.device) -> list[dict[str, Any]]:
    dtype = getattr(torch, options.dtype)
    model = build_model(preset, dtype, options.attention, device)
    pyramid = PyramidConfig.paper_default(model.config, sample_in_training=False)
    apply_pyramid(model, pyramid)
    rows = []
    for batch_size in options.batch_sizes:
        batch = make_batch(model, batch_size, options.text_tokens, device, dtype, options.seed)
        timing = dict(repeats=options.repeats, warmup=options.warmup, device=device)
        with pyramid_disabled(model):
            _reset_peak_memory(device)
            vanilla_prefill = _median_seconds(lambda: _prefill(model, batch), **timing)
            vanilla_memory = _peak_memory_mib(device)
            vanilla_decode = _decode_tokens_per_second(model, batch, options.decode_tokens, **timing)
            vanilla_train = _train_step_seconds(model, batch, **timing) if options.train_step else None
        for routing in options.routings:
            forced = forced_experts(pyramid, routing, batch_size, options.seed).to(device)
            with torch.no_grad():
                record = model(**batch, use_cache=False, logits_to_keep=1, force_experts=forced).routing
            theoretical = float(record.vanilla_flops.sum() / record.flops.sum())
            _reset_peak_memory(device)
            prefill = _median_seconds(lambda: _prefill(model, batch, force_experts=forced), **timing)
            memory = _peak_memory_mib(device)
            decode = _decode_tokens_per_second(model, batch, options.decode_tokens, force_experts=forced, **timing)
            train = _train_step_seconds(model, batch, force_experts=forced, **timing) if options.train_step else None
            measured = vanilla_prefill / prefill
            rows.append({
                "preset": preset, "batch_size": batch_size, "routing": routing,
                "visual_tokens": record.visual_tokens.float().mean(0).tolist(),
                "flops_ratio": 1 / theoretical,
                "prefill_ms": prefill * 1e3, "vanilla_prefill_ms": vanilla_prefill * 1e3,
                "measured_speedup": measured, "theoretical_speedup": theoretical,
                "efficiency": measured / theoretical,
                "decode_tokens_per_s": decode, "vanilla_decode_tokens_per_s": vanilla_decode,
                "peak_memory_mib": memory, "vanilla_peak_memory_mib": vanilla_memory,
                "train_step_ms": None if train is None else train * 1e3,
                "vanilla_train_step_ms": None if vanilla_train is None else vanilla_train * 1e3,
                "train_speedup": None if train is None else vanilla_train / train,
            })
    del model
    return rows


def _prefill(model, batch, **kwargs) -> None:
    with torch.no_grad():
        model(**batch, use_cache=False, logits_to_keep=1, **kwargs)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_bench(options: BenchOptions, device: torch.device | None = None) -> dict[str, Any]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unknown = set(options.routings) - set(ROUTINGS)
    if unknown:
        raise ValueError(f"unknown routings {sorted(unknown)}; choose from {ROUTINGS}")
    rows = [row for preset in options.presets for row in bench_preset(preset, options, device)]
    return {
        "device": device_description(device), "torch": torch.__version__, "dtype": options.dtype,
        "attention": options.attention, "options": asdict(options), "rows": rows,
    }


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
    ("decode tok/s (vanilla)", lambda r: f"{r['decode_tokens_per_s']:.0f} ({r['vanilla_decode_tokens_per_s']:.0f})"),
    ("train step speedup", lambda r: "-" if r["train_speedup"] is None else f"{r['train_speedup']:.2f}x"),
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
