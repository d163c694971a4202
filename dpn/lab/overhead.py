"""The runtime's own cost, apart from the model's layers (``dpn bench``'s overhead columns).

On a small model, timing a forward with and without the pyramid mixes the runtime's bookkeeping
(routers, pooling plans, rebuilding the sequences, per-segment masks, rotary and cache records)
with run-to-run noise of the same size. Here every decoder layer is replaced, for the measurement
only, by one that passes its input through (``layers_passed_through``): what is left of a forward
is the work around the layers, the stock model's (embeddings, vision tower, mask, rotary, head)
with and without the runtime's. Their difference is what the runtime adds per prefill and per
decoding step, whatever the layers cost. A strategy that reads a layer's weights to rank tokens
(FastV, PyramidDrop) still does so: that work is its own.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dpn.api import pyramid_disabled
from dpn.lab.decoding import greedy_continue, prompt_positions
from dpn.lab.timing import paired_medians, sync
from dpn.models import get_adapter


class PassThroughLayer(nn.Module):
    """Stands in for a decoder layer: returns its input and caches a key/value of one number per
    token, so that the cache keeps its length (the masks see the real past) at almost no cost (the
    cache counts no length for rows of width zero). Attributes other than ``forward`` (``self_attn``,
    norms) are the real layer's."""

    def __init__(self, layer: nn.Module, layer_index: int) -> None:
        super().__init__()
        self.layer = layer
        self.layer_index = layer_index

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, hidden_states: torch.Tensor, past_key_values=None, **_: Any) -> torch.Tensor:
        if past_key_values is not None:
            batch, length = hidden_states.shape[:2]
            row = hidden_states.new_empty(batch, 1, length, 1)
            past_key_values.update(row, row, self.layer_index)
        return hidden_states


@contextmanager
def layers_passed_through(model: nn.Module):
    """Every decoder layer of ``model`` replaced by a ``PassThroughLayer`` inside the block."""
    layers = get_adapter(model).decoder(model).layers
    originals = list(layers)
    try:
        for index, layer in enumerate(originals):
            layers[index] = PassThroughLayer(layer, index)
        yield
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer


def _prefill(model, batch, positions, **kwargs):
    with torch.no_grad():
        return model(**batch, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs)


def _decode_step_seconds(model, batch, steps: int, **kwargs) -> float:
    """Seconds per greedy decoding step after an untimed prefill (the value ``paired_medians`` takes)."""
    positions = prompt_positions(model, batch)
    prefill = _prefill(model, batch, positions, **kwargs)
    device = prefill.logits.device
    sync(device)
    began = time.perf_counter()
    with torch.no_grad():
        greedy_continue(model, prefill, batch["attention_mask"], positions, steps + 1)
    sync(device)
    return (time.perf_counter() - began) / steps


def runtime_overhead(model, batch: dict[str, torch.Tensor], forced, steps: int, repeats: int, warmup: int,
                     device: torch.device) -> dict[str, float]:
    """Milliseconds per prefill and microseconds per decoding step that the pyramid on ``model``
    (``forced`` routing) adds to the work around the layers: paired medians, layers passed through."""
    timing = dict(repeats=repeats, warmup=warmup, device=device)
    positions = prompt_positions(model, batch)

    def vanilla(run, *args):
        with pyramid_disabled(model):
            return run(model, *args)

    with layers_passed_through(model):
        vanilla_prefill, prefill = paired_medians(
            lambda: vanilla(_prefill, batch, positions), lambda: _prefill(model, batch, positions, force_experts=forced),
            **timing,
        )
        vanilla_step, step = paired_medians(
            lambda: vanilla(_decode_step_seconds, batch, steps),
            lambda: _decode_step_seconds(model, batch, steps, force_experts=forced), **timing,
        )
    return {
        "overhead_prefill_ms": (prefill - vanilla_prefill) * 1e3,
        "overhead_decode_step_us": (step - vanilla_step) * 1e6,
        "around_layers_prefill_ms": vanilla_prefill * 1e3,
        "around_layers_decode_step_us": vanilla_step * 1e6,
    }
