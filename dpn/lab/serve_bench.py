"""``dpn serve-bench``: requests per second and latency of ``dpn serve`` under a fixed concurrency.

For each pyramid (e.g. the saved one and ``none``) a server runs on a free loopback port; for each
concurrency C, C client threads send the questions of a LLaVA-format file (images as data URLs,
greedy, ``max_tokens`` new tokens) until ``requests`` are answered. Reported per row: requests/s
over the wall time, p50 / p95 latency of a request, the mean batch the server ran them in and
the mean LLM FLOPs ratio of the answers.

With ``url`` it measures a server that is already running instead (any OpenAI-compatible one, e.g.
``vllm serve`` with or without dpn's plugin): the same requests, sent to ``url`` under the served
model's name; the batch and FLOPs columns, which only ``dpn serve`` reports, stay empty.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dpn.lab.data.llava import image_files
from dpn.lab.engine.loading import load_model
from dpn.lab.serve import ServeOptions, start_in_thread

BENCH_MODEL_NAME = "bench"
WARMUP_REQUESTS = 2
REQUEST_TIMEOUT_SECONDS = 600
PERCENTILES = (50, 95)


@dataclass
class ServeBenchOptions:
    model: str
    data: str
    pyramids: list[str] = field(default_factory=lambda: ["saved", "none"])
    concurrencies: list[int] = field(default_factory=lambda: [1, 16])
    requests: int = 64
    max_tokens: int = 8
    batch_window_ms: float = 20.0
    max_batch_size: int = 16
    url: str | None = None  # an OpenAI-compatible server already running (its root, e.g. http://127.0.0.1:8000)
    label: str | None = None  # the rows' name with ``url`` (default: the URL)
    progress: bool = True

    def __post_init__(self) -> None:
        problems = [f"--{name.replace('_', '-')} must be at least 1, got {value}" for name, value in
                    {"requests": self.requests, "max_tokens": self.max_tokens,
                     "max_batch_size": self.max_batch_size}.items() if value < 1]
        problems += [f"--concurrency must be at least 1, got {c}" for c in self.concurrencies if c < 1]
        if not Path(self.data).is_file():
            problems.append(f"no LLaVA-format data at {self.data}")
        if problems:
            raise ValueError("; ".join(problems))


def request_bodies(data: str, max_tokens: int, model: str = BENCH_MODEL_NAME) -> list[bytes]:
    """A chat-completions body per sample of ``data`` (its first question; its images as data URLs)."""
    records = json.loads(Path(data).read_text())
    folder = Path(data).parent
    bodies = []
    for record in records:
        question = next(t["value"] for t in record["conversations"] if t.get("from") in ("human", "user"))
        parts: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                       + base64.b64encode((folder / name).read_bytes()).decode()}}
            for name in image_files(record)
        ]
        parts.append({"type": "text", "text": question.replace("<image>", "").strip()})
        bodies.append(json.dumps({"model": model, "messages": [{"role": "user", "content": parts}],
                                  "max_tokens": max_tokens, "temperature": 0}).encode())
    if not bodies:
        raise ValueError(f"{data} holds no samples")
    return bodies


def _send(url: str, body: bytes) -> tuple[float, dict]:
    start = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
        reply = json.loads(response.read())
    return time.perf_counter() - start, reply


def _percentile(values: list[float], percent: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))]


def run_serve_bench(options: ServeBenchOptions) -> list[dict[str, Any]]:
    if options.url is not None:  # a running server, which knows the model by the name it was served under
        bodies = request_bodies(options.data, options.max_tokens, model=options.model)
        url = f"{options.url.rstrip('/')}/v1/chat/completions"
        for body in bodies[:WARMUP_REQUESTS]:
            _send(url, body)
        return [_measure(url, bodies, options.label or options.url, c, options) for c in options.concurrencies]
    bodies = request_bodies(options.data, options.max_tokens)
    rows = []
    for pyramid in options.pyramids:
        model, processor = load_model(options.model, pyramid)
        server = start_in_thread(model, processor, ServeOptions(
            model=options.model, pyramid=pyramid, name=BENCH_MODEL_NAME, port=0,
            batch_window_ms=options.batch_window_ms, max_batch_size=options.max_batch_size,
            max_queue=max(options.concurrencies) + 1))
        url = f"{server.url}/v1/chat/completions"
        try:
            for body in bodies[:WARMUP_REQUESTS]:
                _send(url, body)
            for concurrency in options.concurrencies:
                rows.append(_measure(url, bodies, pyramid, concurrency, options))
        finally:
            server.stop()
    return rows


def _measure(url: str, bodies: list[bytes], pyramid: str, concurrency: int,
             options: ServeBenchOptions) -> dict[str, Any]:
    work = [bodies[i % len(bodies)] for i in range(options.requests)]
    bar = tqdm(total=len(work), desc=f"{pyramid} x {concurrency}", disable=not options.progress)

    def send(body: bytes) -> tuple[float, dict]:
        result = _send(url, body)
        bar.update(1)
        return result

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, work))
    wall = time.perf_counter() - start
    bar.close()
    latencies = [seconds for seconds, _ in results]
    extras = [reply["dpn"] for _, reply in results if "dpn" in reply]  # dpn serve's own fields, if it is one
    ratios = [e["flops_ratio"] for e in extras if e["flops_ratio"] is not None]
    return {
        "pyramid": pyramid, "concurrency": concurrency, "requests": len(work), "seconds": wall,
        "requests_per_second": len(work) / wall,
        **{f"p{p}_ms": _percentile(latencies, p) * 1e3 for p in PERCENTILES},
        "mean_batch": statistics.mean(e["batch_size"] for e in extras) if extras else None,
        "flops_ratio": (statistics.mean(ratios) if ratios else 1.0) if extras else None,
        "max_tokens": options.max_tokens,
    }
