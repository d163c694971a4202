"""KV-cache memory: what a pyramid saves while decoding.

Every decoder layer caches one key and one value vector per key/value head for each token it
processed. With a pyramid, the layers after a stage cache only the tokens that stage kept (the
``PyramidCache`` holds each segment's own, shorter layout), so a sequence's cache is

    bytes = sum over layers of (tokens the layer processed + new tokens) x 2 x kv_heads x head_dim x bytes per value

``kv_cache_bytes`` computes it from per-layer token counts (``PyramidRouting.layer_tokens``, or a
plan's); ``cache_bytes`` measures what a filled cache really holds (batch padding included).
"""

from __future__ import annotations

from typing import Any

import torch

KEY_AND_VALUE = 2


def kv_bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    """Bytes one token occupies in one decoder layer's cache."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return KEY_AND_VALUE * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def kv_cache_bytes(text_config: Any, layer_tokens, dtype: torch.dtype, new_tokens: int = 0):
    """Cache bytes of a sequence whose layers processed ``layer_tokens`` (a list per layer, or a
    (batch, layers) tensor: one figure per sequence), after ``new_tokens`` decoded tokens."""
    per_token = kv_bytes_per_token(text_config, dtype)
    if isinstance(layer_tokens, torch.Tensor):
        layers = layer_tokens.shape[-1]
        return (layer_tokens.to(torch.float64).sum(-1) + layers * new_tokens) * per_token
    return (sum(layer_tokens) + len(layer_tokens) * new_tokens) * per_token


def cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values a filled ``DynamicCache`` (or ``PyramidCache``) holds."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
               if getattr(layer, "keys", None) is not None and layer.keys.numel())


def largest_decoding_batch(bytes_per_sequence: float, budget_bytes: float) -> int:
    """How many sequences of ``bytes_per_sequence`` cache fit in ``budget_bytes`` (weights and
    activations not counted)."""
    return int(budget_bytes // bytes_per_sequence) if bytes_per_sequence > 0 else 0


__all__ = ["cache_bytes", "kv_bytes_per_token", "kv_cache_bytes", "largest_decoding_batch"]
