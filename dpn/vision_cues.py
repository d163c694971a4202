"""What a vision tower with a class token says about each visual token, for strategies that rank
tokens before the LLM (VisPruner, arXiv 2412.01818): how much the class token attends to each
patch in the feature layer, and each patch's feature before the projector.

The stock vision forward is left as it is (sdpa or eager): the adapter asks it for the hidden
states entering and leaving the feature layer, and the class token's attention row is recomputed
here from the layer's own normalisation and projections (one query row, float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VisionCues:
    """Per token of the LLM input (batch, length): zero / empty outside the visual tokens.

    Attributes:
        importance: (batch, length) float32, the class token's attention to the token's patch in
            the vision tower's feature layer, averaged over heads.
        features: (batch, length, vision width) the patch's feature-layer output, before the projector.
    """

    importance: torch.Tensor
    features: torch.Tensor


def feature_layer_index(feature_layer: int, num_layers: int) -> int:
    """The encoder layer whose output is ``hidden_states[feature_layer]`` (hidden_states[0] being the
    embeddings): a ``ValueError`` for the embeddings themselves or out of range."""
    states = num_layers + 1
    if not -states <= feature_layer < states or feature_layer % states == 0:
        raise ValueError(f"vision feature layer {feature_layer} is not the output of one of the tower's "
                         f"{num_layers} encoder layers")
    return feature_layer % states - 1


def class_token_attention(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """(images, tokens - 1) the attention the class token (token 0) pays each patch inside a
    CLIP-style encoder ``layer`` (``layer_norm1``, then ``self_attn`` with ``q_proj`` / ``k_proj``),
    averaged over heads; ``layer_input`` (images, tokens, width) is what the layer received."""
    attention = layer.self_attn
    normed = layer.layer_norm1(layer_input).float()
    images, tokens, _ = normed.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    weight_q, weight_k = attention.q_proj.weight.float(), attention.k_proj.weight.float()
    bias_q = None if attention.q_proj.bias is None else attention.q_proj.bias.float()
    bias_k = None if attention.k_proj.bias is None else attention.k_proj.bias.float()
    query = nn.functional.linear(normed[:, :1], weight_q, bias_q).view(images, 1, heads, head_dim).transpose(1, 2)
    keys = nn.functional.linear(normed, weight_k, bias_k).view(images, tokens, heads, head_dim).transpose(1, 2)
    weights = torch.softmax(query @ keys.transpose(-1, -2) * attention.scale, dim=-1)  # (images, heads, 1, tokens)
    return weights[:, :, 0, 1:].mean(1)
