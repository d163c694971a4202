"""Analytic FLOPs from the token counts each layer actually processed.

Convention (the same as ``torch.utils.flop_counter``): only matrix products are counted, at 2 FLOPs
per multiply-accumulate. Norms, activations, rotary embeddings, softmax and residual adds are
ignored (well under 1% of a decoder layer). Attention is counted dense: ``q_tokens x kv_tokens``
for both ``QK^T`` and ``AV``, the causal half is not subtracted (kernels that skip it are faster
than this count says, for every strategy alike).

Decoder layer with ``q`` query tokens attending to ``kv`` keys, hidden size ``d``, ``H`` query
heads and ``G`` key/value heads of size ``h`` (GQA), and gated MLP width ``m`` (SwiGLU: gate, up,
down)::

    projections = 2 q d (H h) + 2 * 2 q d (G h) + 2 q (H h) d
    attention   = 2 * 2 q kv H h
    mlp         = 3 * 2 q d m

Vision tower (CLIP/SigLIP-style ViT) and projector FLOPs are reported separately; they do not
depend on the pyramid.

``convention="fastv"`` counts as FastV's paper does (Table 1): ``4 n d^2 + 2 n^2 d + 2 n d m`` per
layer for ``n`` tokens, one FLOP per multiply-add, four d x d projections and a two-matrix MLP. The
ratios of the two conventions differ a little (the MLP's share); with FastV's settings (36 text
tokens) the FastV convention reproduces its table.
"""

from __future__ import annotations

from typing import Any

import torch

from dpn.models import geometry_of
from dpn.spans import Gap, Grid

GIGA = 1e9
FLOPS_PER_MAC = 2
GATED_MLP_MATRICES = 3  # gate, up and down projections
CONVENTIONS = ("dpn", "fastv")


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def decoder_layer_flops(config: Any, q_tokens, kv_tokens):
    """FLOPs of one decoder layer; ``q_tokens`` and ``kv_tokens`` may be ints or tensors."""
    d = config.hidden_size
    h = _head_dim(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    projections = FLOPS_PER_MAC * q_tokens * d * (2 * heads * h + 2 * kv_heads * h)
    attention = 2 * FLOPS_PER_MAC * q_tokens * kv_tokens * heads * h
    mlp = GATED_MLP_MATRICES * FLOPS_PER_MAC * q_tokens * d * config.intermediate_size
    return projections + attention + mlp


def fastv_layer_flops(config: Any, tokens):
    """One decoder layer as FastV's paper counts it: ``4 n d^2 + 2 n^2 d + 2 n d m``."""
    d, m = config.hidden_size, config.intermediate_size
    return 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * m


def decoder_flops(config: Any, layer_tokens, kv_tokens=None, convention: str = "dpn"):
    """Total decoder FLOPs for per-layer query counts (prefill: keys = queries unless given).

    ``layer_tokens`` is a list of ints (one per layer) or a (batch, layers) tensor; ``convention``
    one of ``CONVENTIONS`` (``fastv``: prefill only, keys = queries).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if convention == "fastv":
        return sum(fastv_layer_flops(config, n) for n in layer_tokens)
    if kv_tokens is None:
        kv_tokens = layer_tokens
    if isinstance(layer_tokens, torch.Tensor):
        q = layer_tokens.to(torch.float64)
        kv = kv_tokens.to(torch.float64)
        return decoder_layer_flops(config, q, kv).sum(-1)
    return sum(decoder_layer_flops(config, q, kv) for q, kv in zip(layer_tokens, kv_tokens))


def vision_flops(vision_config: Any, text_hidden_size: int, num_images: int = 1) -> int:
    """Vision tower (all layers, as transformers runs them) plus the two-layer MLP projector."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    tokens = patches + (1 if vision_config.model_type == "clip_vision_model" else 0)
    dv = vision_config.hidden_size
    patch_embed = FLOPS_PER_MAC * patches * vision_config.num_channels * vision_config.patch_size**2 * dv
    per_layer = (
        FLOPS_PER_MAC * tokens * dv * dv * 4  # q, k, v, o
        + 2 * FLOPS_PER_MAC * tokens * tokens * dv  # QK^T and AV
        + 2 * FLOPS_PER_MAC * tokens * dv * vision_config.intermediate_size  # fc1, fc2
    )
    projector = FLOPS_PER_MAC * patches * (dv * text_hidden_size + text_hidden_size * text_hidden_size)
    return num_images * (patch_embed + vision_config.num_hidden_layers * per_layer + projector)


def segment_layer_tokens(num_layers: int, stage_layers: list[int], segment_tokens: list[int]) -> list[int]:
    """Expand tokens per segment (before stage 0, after stage 0, ...) to tokens per decoder layer."""
    bounds = [*(layer + 1 for layer in stage_layers), num_layers]
    counts, first = [], 0
    for tokens, end in zip(segment_tokens, bounds):
        counts.extend([tokens] * (end - first))
        first = end
    return counts


def path_flops(model: Any, pyramid: Any, text_tokens: int, layout: tuple | None = None,
               convention: str = "dpn") -> list[dict]:
    """One row per routing path of ``pyramid`` (a ``PyramidConfig``) on ``model`` (a model, its
    config or its ``ModelGeometry``): labels, visual tokens per segment, LLM prefill GFLOPs and the
    ratio to the vanilla model, and the tokens each layer processes (what it caches: ``dpn.memory``),
    for one image and ``text_tokens`` text tokens. The paths come from
    the strategy's config (``token_paths``), so every registered strategy is counted the same way.

    ``layout``: the image's grids, ``(rows, cols)`` or ``dpn.spans.Grid`` parts (a grid with row
    newlines keeps one per row; other placeholders count as text), for families whose grids vary
    per image; default: the model's fixed grids. ``convention``: see the module docstring.
    """
    geometry = geometry_of(model)
    if layout is None:
        if geometry.image_grids is None:
            raise ValueError(f"{geometry.model_type} images have no fixed grid; give the image's layout")
        layout = geometry.image_grids
    parts = [part if isinstance(part, (Grid, Gap)) else Grid(*part) for part in layout]
    grids = [(part.rows, part.cols) for part in parts if isinstance(part, Grid)]
    newline = [part.newline for part in parts if isinstance(part, Grid)]
    extra = sum(part.count for part in parts if isinstance(part, Gap))  # placeholders outside any grid
    text_config, num_layers = geometry.text_config, geometry.num_layers
    layers = [stage.layer for stage in pyramid.stages]
    vanilla = decoder_flops(text_config, [text_tokens + sum(part.tokens for part in parts)] * num_layers,
                            convention=convention)
    rows = []
    for path in pyramid.strategy.token_paths(pyramid.stages, tuple(grids)):
        newlines = [sum(r for r, n in zip(segment, newline) if n) for segment in path.rows()]
        segments = [text_tokens + extra + v + n for v, n in zip(path.visual_tokens, newlines)]
        tokens = segment_layer_tokens(num_layers, layers, segments)
        flops = decoder_flops(text_config, tokens, convention=convention)
        rows.append({"experts": path.labels, "visual_tokens": path.visual_tokens, "llm_gflops": flops / GIGA,
                     "ratio": flops / vanilla, "layer_tokens": tokens})
    return rows
