"""One row of a decoder layer's attention map, computed apart from the layer's own forward.

Token-selection strategies (FastV, PyramidDrop) rank visual tokens by the attention they receive
from the last prompt token. Asking the model for attention weights would force the eager kernel
on every layer; instead this recomputes the single query row the ranking needs from the layer's
input, with the layer's own norm, projections and rotary embedding. The model keeps running
sdpa / flash attention.

Written for the transformers v5 layout of Llama-family attention (Llama, Qwen2, Mistral, Qwen3):
``input_layernorm``, ``self_attn.{q,k}_proj``, optional ``self_attn.{q,k}_norm``, ``head_dim``,
``scaling`` and grouped key/value heads. Attention is full causal (a sliding window is ignored).
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@torch.no_grad()
def query_attention(
    layer: nn.Module,
    layer_input: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    valid: torch.Tensor,
    query_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of each sample's query token(s) over its sequence, head-averaged.

    Args:
        layer: a decoder layer.
        layer_input: (batch, length, d) the hidden states the layer received (or would receive).
        position_embeddings: the (cos, sin) of shape (batch, length, head_dim) the layer runs with.
        query_index: (batch,) position of the query token in each sample, or (batch, Q) positions of
            several query tokens whose rows are averaged.
        valid: (batch, length) real (non-padding) tokens.
        query_valid: (batch, Q) which of the Q queries are real (default: all); every sample needs one.

    Returns:
        (batch, length) float32; zero at padding and after the (last) query.
    """
    attention = layer.self_attn
    batch, length, _ = layer_input.shape
    head_dim = attention.head_dim
    if query_index.ndim == 1:
        query_index = query_index[:, None]
    if query_valid is None:
        query_valid = torch.ones_like(query_index, dtype=torch.bool)
    # Padding queries repeat the first (real) one: a row of a padding position could see nothing.
    query_index = torch.where(query_valid, query_index, query_index[:, :1])
    rows = torch.arange(batch, device=layer_input.device)[:, None]
    normed = layer.input_layernorm(layer_input)
    queries = query_index.shape[1]
    query = attention.q_proj(normed[rows, query_index]).view(batch, queries, -1, head_dim)
    if hasattr(attention, "q_norm"):
        query = attention.q_norm(query)
    cos, sin = position_embeddings
    query = _rotate(query, cos.to(query.dtype)[rows, query_index][:, :, None],
                    sin.to(query.dtype)[rows, query_index][:, :, None])
    keys = _rotated_keys(attention, normed, position_embeddings)
    query, keys = query.transpose(1, 2).float(), keys.transpose(1, 2).float()  # (b, H, Q, hd), (b, G, L, hd)
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    scores = (query @ keys.transpose(-1, -2)) * attention.scaling  # (b, H, Q, L)
    positions = torch.arange(length, device=valid.device)
    visible = valid[:, None, :] & (positions[None, None, :] <= query_index[:, :, None])  # (b, Q, L)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    per_query = torch.softmax(scores, dim=-1).mean(1)  # (b, Q, L)
    weights = query_valid.float() / query_valid.sum(1, keepdim=True).clamp(min=1)
    return (per_query * weights[:, :, None]).sum(1)


def _rotated_keys(attention: nn.Module, normed: torch.Tensor, position_embeddings) -> torch.Tensor:
    """(batch, length, key heads, head_dim): the attention's keys of the normed layer input, rotated."""
    batch, length, _ = normed.shape
    keys = attention.k_proj(normed).view(batch, length, -1, attention.head_dim)
    if hasattr(attention, "k_norm"):
        keys = attention.k_norm(keys)
    cos, sin = position_embeddings
    return _rotate(keys, cos.to(keys.dtype)[:, :, None], sin.to(keys.dtype)[:, :, None])


@torch.no_grad()
def layer_keys(layer: nn.Module, layer_input: torch.Tensor, position_embeddings) -> torch.Tensor:
    """(batch, length, key heads * head_dim): the keys ``layer`` computes for ``layer_input``, after
    its rotary embedding, every key head side by side (what DART scores its pivots by)."""
    keys = _rotated_keys(layer.self_attn, layer.input_layernorm(layer_input), position_embeddings)
    return keys.flatten(2)
