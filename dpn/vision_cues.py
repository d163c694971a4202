"""What a vision tower with a class token says about each image, for strategies that choose tokens
before the LLM: VisPruner (arXiv 2412.01818) and VisionZip (arXiv 2412.04467) rank patches by the
class token's attention in the feature layer, compare them by their features or keys, and
VisionZip projects merged features itself.

The stock vision forward is left as it is (sdpa or eager): the adapter asks it for the hidden
states entering and leaving the feature layer, and the class token's attention row and the keys
are recomputed here from that layer's own normalisation and projections (float32, no gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dpn.spans import VisualSpans


@dataclass
class VisionCues:
    """One entry per image, in the order of the call's visual spans (one grid per image).

    Attributes:
        attention: (images, patches) float32, the class token's attention to each patch in the
            feature layer, averaged over heads.
        keys: (images, patches, head_dim) float32, each patch's key in that layer, averaged over heads.
        features: (images, patches, vision width) the patches' feature-layer output (before the projector).
        class_feature: (images, vision width) the class token's feature-layer output.
        projector: the family's projector from vision width to the LLM's (what a merged feature goes through).
    """

    attention: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor
    class_feature: torch.Tensor
    projector: nn.Module


def cues_of_spans(cues: VisionCues | None, spans: VisualSpans, name: str) -> VisionCues:
    """``cues``, checked to hold one image per visual span with that span's tokens (a ``ValueError``
    naming strategy ``name`` when the adapter gave none or they do not match)."""
    if cues is None:
        raise ValueError(f"{name} needs the vision tower's cues; the model's adapter gave none")
    patches = cues.attention.shape[1]
    if cues.attention.shape[0] != len(spans) or any(spans.size(k) != patches for k in range(len(spans))):
        raise ValueError(f"{name} needs one run of image tokens per image, each of the image's {patches} patches; "
                         "the batch's visual spans do not match its images")
    return cues


def feature_layer_index(feature_layer: int, num_layers: int) -> int:
    """The encoder layer whose output is ``hidden_states[feature_layer]`` (hidden_states[0] being the
    embeddings): a ``ValueError`` for the embeddings themselves or out of range."""
    states = num_layers + 1
    if not -states <= feature_layer < states or feature_layer % states == 0:
        raise ValueError(f"vision feature layer {feature_layer} is not the output of one of the tower's "
                         f"{num_layers} encoder layers")
    return feature_layer % states - 1


def class_token_cues(layer: nn.Module, layer_input: torch.Tensor, layer_output: torch.Tensor,
                     projector: nn.Module) -> VisionCues:
    """The cues of a CLIP-style encoder ``layer`` (``layer_norm1``, then ``self_attn`` with
    ``q_proj`` / ``k_proj``) that received ``layer_input`` and gave ``layer_output`` (images,
    tokens, width), token 0 being the class token."""
    attention = layer.self_attn
    with torch.no_grad():
        normed = layer.layer_norm1(layer_input).float()
        images, tokens, _ = normed.shape
        heads, head_dim = attention.num_heads, attention.head_dim
        query = _project(attention.q_proj, normed[:, :1]).view(images, 1, heads, head_dim).transpose(1, 2)
        keys = _project(attention.k_proj, normed).view(images, tokens, heads, head_dim).transpose(1, 2)
        weights = torch.softmax(query @ keys.transpose(-1, -2) * attention.scale, dim=-1)  # (images, heads, 1, tokens)
    return VisionCues(attention=weights[:, :, 0, 1:].mean(1), keys=keys[:, :, 1:].mean(1),
                      features=layer_output[:, 1:], class_feature=layer_output[:, 0], projector=projector)


def _project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if linear.bias is None else linear.bias.float()
    return nn.functional.linear(x, linear.weight.float(), bias)
