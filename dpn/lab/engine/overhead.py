"""Decoder layers passed through, to time the runtime's own cost (``dpn bench``'s overhead columns).

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

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dpn.compat import pop_cache
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

    def forward(self, hidden_states: torch.Tensor, **arguments: Any) -> torch.Tensor:
        cache = pop_cache(arguments)
        if cache is not None:
            batch, length = hidden_states.shape[:2]
            row = hidden_states.new_empty(batch, 1, length, 1)
            cache.update(row, row, self.layer_index)
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
