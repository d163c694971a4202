"""Wall-clock timing that is fair to both sides of a comparison (CUDA-synchronised, interleaved)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Callable, device: torch.device) -> float:
    """Wall time of ``run()``, or the seconds it returns when it times itself (decoding after a prefill)."""
    sync(device)
    start = time.perf_counter()
    own = run()
    sync(device)
    return own if isinstance(own, float) else time.perf_counter() - start


def paired_medians(run_a: Callable, run_b: Callable, repeats: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of two runs timed alternately, so drift (allocator, clocks) hits both alike."""
    for _ in range(warmup):
        run_a()
        run_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(seconds(run_a, device))
        times_b.append(seconds(run_b, device))
    return statistics.median(times_a), statistics.median(times_b)


def prefill_forward(model, batch: dict, use_cache: bool = False, **kwargs) -> None:
    """One forward without gradients that computes only the last position's logits: the prefill
    the latency columns of ``dpn eval`` and ``dpn bench`` time."""
    with torch.no_grad():
        model(**batch, use_cache=use_cache, logits_to_keep=1, **kwargs)
