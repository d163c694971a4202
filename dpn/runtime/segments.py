"""Segments: the decoder layers between two stages, run on one layout.

Each segment gets its own attention masks (``create_causal_mask`` from its 2D key mask) and rotary
embeddings; after a stage with per-sample routing, samples of similar length may run the
segment's layers as separate groups (``length_groups``), each padded to its own longest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from dpn.compat import cache_keyword
from dpn.runtime.cache import PyramidCache
from dpn.runtime.inputs import last_valid
from dpn.runtime.layout import BatchLayout
from dpn.transfer import host_tensor

# Length grouping (``length_groups``): samples within 10% of their group's longest share a group;
# grouping is used when it cuts the token rows computed by at least 15%.
PADDING_TOLERANCE = 0.1
MIN_GROUPING_SAVING = 0.15
# Attention kernels whose one-token decoding masks ``step_masks`` builds itself.
STEP_MASK_IMPLEMENTATIONS = ("sdpa", "eager")
MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def segment_bounds(config, num_layers: int) -> list[tuple[int, int]]:
    edges = [0, *(stage.layer + 1 for stage in config.stages), num_layers]
    return list(zip(edges[:-1], edges[1:]))


def layer_types_of(text_config: Any) -> list[str]:
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        return list(layer_types)
    kind = "sliding_attention" if getattr(text_config, "sliding_window", None) is not None else "full_attention"
    return [kind] * text_config.num_hidden_layers


def attention_masks(text_config, layer_types, first, end, hidden, key_mask, cache, positions) -> dict[str, Any]:
    masks = step_masks(text_config, layer_types, first, end, hidden, key_mask)
    if masks is not None:
        return masks
    masks = {}
    for index in range(first, end):
        kind = layer_types[index]
        if kind in masks:
            continue
        if kind not in MASK_FUNCTIONS:
            raise ValueError(f"dpn does not support decoder layers of type {kind!r}")
        masks[kind] = MASK_FUNCTIONS[kind](
            config=text_config,
            inputs_embeds=hidden,
            attention_mask=key_mask,
            **cache_keyword(cache),
            position_ids=positions,
            layer_idx=index,
        )
    return masks


def step_masks(text_config, layer_types, first, end, hidden, key_mask) -> dict[str, Any] | None:
    """The masks of a one-token decoding step, built without reading the device, or None to build
    them the general way.

    One query token attends to every real cached key of its segment and to itself, so its mask is
    the segment's key mask as it is: (batch, 1, 1, keys), additive. The general builder would ask
    the device whether any key is padding (to drop the mask), once per segment and step.
    Sliding-window layers and other attention kernels take the general way.
    """
    implementation = getattr(text_config, "_attn_implementation", None)
    if hidden.shape[1] != 1 or implementation not in STEP_MASK_IMPLEMENTATIONS:
        return None
    if any(layer_types[index] != "full_attention" for index in range(first, end)):
        return None
    # Additive (0 / dtype min), for both kernels: sdpa would turn a bool mask into this in every layer.
    mask = torch.zeros((key_mask.shape[0], 1, 1, key_mask.shape[1]), dtype=hidden.dtype, device=key_mask.device)
    return {"full_attention": mask.masked_fill_(~key_mask[:, None, None, :], torch.finfo(hidden.dtype).min)}


def prepare_cache(cache: Any, use_cache: bool, model_config: Any, num_segments: int):
    if isinstance(cache, PyramidCache):
        if cache.num_segments != num_segments:
            raise ValueError(
                f"this PyramidCache has {cache.num_segments} segments but the pyramid has {num_segments}"
            )
        return cache
    if cache is not None:
        if cache.get_seq_length() > 0:
            raise ValueError(
                f"the cache is a filled {type(cache).__name__} from a model without this pyramid; "
                "its layers do not match the pyramid's layouts. Start from an empty cache or a PyramidCache."
            )
        return PyramidCache(config=model_config, num_segments=num_segments)
    return PyramidCache(config=model_config, num_segments=num_segments) if use_cache else None


def run_layers(layers, layer_types, bounds, hidden, masks, position_embeddings, positions, cache, use_cache: bool,
               layer_arguments: dict) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run decoder layers ``bounds[0]..bounds[1]-1``: the output, the last layer's input, every layer's output."""
    outputs = ()
    layer_input = hidden
    for index in range(*bounds):
        layer_input = hidden
        hidden = layers[index](
            hidden,
            attention_mask=masks[layer_types[index]],
            position_embeddings=position_embeddings,
            position_ids=positions,
            **cache_keyword(cache),
            use_cache=use_cache,
            **layer_arguments,
        )
        outputs += (hidden,)
    return hidden, layer_input, outputs


def length_groups(lengths: list[int], width: int, device: torch.device) -> list[tuple[torch.Tensor, int]] | None:
    """Split a left-padded batch of ``width`` columns and per-sample ``lengths`` (real tokens, known
    on the host) into groups of similar length, or None when that saves little.

    After a stage with per-sample routing, one sample that kept every token sets the padded length
    of the whole batch, and every layer would run at that length. Groups of samples whose lengths
    are within ``PADDING_TOLERANCE`` of their longest run separately, each padded to its own longest.
    Returns (sample indices, padded length) per group, when the token rows computed fall by at least
    ``MIN_GROUPING_SAVING``.
    """
    batch = len(lengths)
    order = sorted(range(batch), key=lambda sample: -lengths[sample])  # stable: ties keep batch order
    sorted_lengths = [lengths[sample] for sample in order]
    groups, start = [], 0
    for i in range(1, batch + 1):
        if i == batch or sorted_lengths[i] < sorted_lengths[start] * (1 - PADDING_TOLERANCE):
            groups.append((host_tensor(order[start:i], device), max(1, sorted_lengths[start])))
            start = i
    rows = sum(len(members) * length for members, length in groups)
    if len(groups) == 1 or rows > (1 - MIN_GROUPING_SAVING) * batch * width:
        return None
    return groups


# ------------------------------------------------------------------------------------- running
@dataclass
class SegmentResult:
    layout: BatchLayout  # the segment's output layout and hidden states
    last_layer_input: torch.Tensor | None  # input of its last layer (what a stage after it may rank with)
    position_embeddings: Any  # the rotary (cos, sin) its layers ran with
    layer_outputs: tuple[torch.Tensor, ...]  # every layer's output (only when hidden states are collected)
    queries: torch.Tensor | None  # (batch,) tokens each of its layers processed per sample (when recording)
    keys: torch.Tensor | None  # (batch,) keys each of its layers attended to per sample (when recording)


@dataclass
class SegmentRunner:
    """Runs one call's segments; holds what is fixed for the call (nothing about it stays on the model)."""

    model_config: Any
    text_config: Any
    decoder: torch.nn.Module
    layers: list
    layer_types: list[str]
    policy: Any  # the adapter's position policy
    cache: PyramidCache | None
    use_cache: bool
    layer_arguments: dict
    group_by_length: bool
    collect_hidden: bool
    input_last: torch.Tensor | None  # (batch,) last input position, when renumbered segments must record a shift
    record: bool  # count tokens per segment for the routing record (prefill; decoding steps skip it)
    # The last masks ((key mask, positions), masks): a segment on the same layout, past and positions
    # as the one before it (a stage that changed nothing) reuses them.
    masks: tuple[tuple[torch.Tensor, torch.Tensor], dict] | None = None
    # (positions, shift) object ids -> (positions, shift, shifted positions, rotary (cos, sin)): segments
    # with the same positions and shift tensors share them (the entry holds both, so the ids stay theirs).
    rotaries: dict[tuple[int, int], tuple] = field(default_factory=dict)
    # The last (positions, shift, recorded shift): a segment after a stage that changed nothing reuses it.
    recorded_shift: tuple | None = None

    def run(self, segment: int, bounds: tuple[int, int], layout: BatchLayout, reshaped: bool) -> SegmentResult:
        first, end = bounds
        batch, device, cache = layout.valid.shape[0], layout.valid.device, self.cache
        shift = cache.shift(segment) if cache is not None else 0
        positions, position_embeddings = self.positions_and_rotary(segment, layout, shift)
        past_mask = (cache.past_mask(segment, batch, device) if cache is not None
                     else torch.zeros(batch, 0, dtype=torch.bool, device=device))
        key_mask = torch.cat([past_mask, layout.valid], dim=1) if past_mask.shape[1] else layout.valid
        groups = None
        if (reshaped and not self.collect_hidden and past_mask.shape[1] == 0 and end > first and self.group_by_length
                and all(self.layer_types[index] == "full_attention" for index in range(first, end))):
            groups = length_groups(layout.lengths, layout.valid.shape[1], device)
        outputs: tuple[torch.Tensor, ...] = ()
        if groups is not None:
            hidden, last_input = self.run_length_groups(bounds, layout, positions, groups)
        else:
            hidden, last_input, outputs = self.run_layers(bounds, layout.hidden, key_mask, positions,
                                                          position_embeddings, cache)
        layout = replace(layout, hidden=hidden)
        if cache is not None:
            new_shift = None
            if reshaped and self.input_last is not None:
                new_shift = self.new_shift(layout, shift)
            cache.record(segment, key_mask, new_shift)
        if not self.record:
            return SegmentResult(layout, last_input, position_embeddings, outputs, None, None)
        queries = layout.valid.sum(1)
        return SegmentResult(layout, last_input, position_embeddings, outputs, queries, past_mask.sum(1) + queries)

    def positions_and_rotary(self, segment: int, layout: BatchLayout,
                             shift: torch.Tensor | int) -> tuple[torch.Tensor, Any]:
        """The segment's positions (``layout.positions`` less its shift) and their rotary (cos, sin),
        computed once for segments that share positions and shift."""
        key = (id(layout.positions), id(shift))
        if key not in self.rotaries and segment == 0 and not self.record and self.cache is not None:
            self.rotaries.update(self.step_rotaries(layout))
        if key not in self.rotaries:
            positions = self.policy.shifted(layout.positions, shift)
            self.rotaries[key] = (layout.positions, shift, positions, self.decoder.rotary_emb(layout.hidden, positions))
        return self.rotaries[key][2:]

    def step_rotaries(self, layout: BatchLayout) -> dict[tuple[int, int], tuple]:
        """At a decoding step every segment sees the same input positions less its own shift: the
        rotary of all distinct shifts in one call, the shifted positions stacked along the batch.
        (Only for the plain rotary: a dynamic one adapts to the largest position it is given.)"""
        distinct = {}
        for segment in range(self.cache.num_segments):
            shift = self.cache.shift(segment)
            distinct[id(shift)] = shift
        if len(distinct) < 2 or getattr(self.decoder.rotary_emb, "rope_type", None) != "default":
            return {}
        shifted = [self.policy.shifted(layout.positions, shift) for shift in distinct.values()]
        batch_dim = layout.positions.ndim - 2  # (batch, length), or (axes, batch, length) for M-RoPE
        cos, sin = self.decoder.rotary_emb(layout.hidden, torch.cat(shifted, batch_dim))
        batch = layout.hidden.shape[0]
        return {(id(layout.positions), key): (layout.positions, shift, positions, (c, s))
                for (key, shift), positions, c, s in zip(distinct.items(), shifted, cos.split(batch), sin.split(batch))}

    def new_shift(self, layout: BatchLayout, shift: torch.Tensor | int) -> torch.Tensor:
        """The shift the segment records: later tokens come with input positions, and this segment's
        positions lag by what pooling removed. A segment after a stage that changed nothing (same
        positions, same shift) records the very tensor the one before it did, so that decoding steps
        compute their positions and rotary once for both."""
        last = self.recorded_shift
        if last is not None and last[0] is layout.positions and last[1] is shift:
            return last[2]
        segment_last = self.policy.at(layout.positions, last_valid(layout.valid))
        new_shift = shift + (self.input_last - segment_last)
        self.recorded_shift = (layout.positions, shift, new_shift)
        return new_shift

    def run_layers(self, bounds, hidden, key_mask, positions, position_embeddings, cache):
        """Run decoder layers ``bounds[0]..bounds[1]-1``: the output, the last layer's input, every layer's output."""
        first, end = bounds
        key = (key_mask, positions)
        if (self.masks is not None and all(a is b for a, b in zip(self.masks[0], key))
                and all(kind in self.masks[1] for kind in self.layer_types[first:end])):
            masks = self.masks[1]
        else:
            masks = attention_masks(self.text_config, self.layer_types, first, end, hidden, key_mask, cache,
                                    self.policy.mask_position_ids(positions))
            self.masks = (key, masks)
        return run_layers(self.layers, self.layer_types, bounds, hidden, masks, position_embeddings,
                          self.policy.layer_position_ids(positions), cache, self.use_cache, self.layer_arguments)

    def run_length_groups(self, bounds, layout: BatchLayout, positions, groups) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one segment's layers group by group (see ``length_groups``); returns the segment's output
        and the last layer's input in the full left-padded layout, and fills the cache as one call would."""
        first, end = bounds
        length = layout.hidden.shape[1]
        outputs, last_inputs, group_caches = [], [], []
        for members, group_length in groups:
            window = slice(length - group_length, length)
            hidden = layout.hidden[members, window]
            group_positions = positions[..., members, window]  # (batch, length) or (axes, batch, length)
            group_cache = DynamicCache(config=self.model_config) if self.cache is not None else None
            hidden, layer_input, _ = self.run_layers(bounds, hidden, layout.valid[members, window], group_positions,
                                                     self.decoder.rotary_emb(hidden, group_positions), group_cache)
            left = (0, 0, length - group_length, 0)  # pad the sequence dimension on the left
            outputs.append(F.pad(hidden, left))
            last_inputs.append(F.pad(layer_input, left))
            group_caches.append((group_cache, left))
        order = torch.cat([members for members, _ in groups])

        def merge(parts: list[torch.Tensor]) -> torch.Tensor:
            stacked = torch.cat(parts)
            return stacked.new_zeros(stacked.shape).index_copy(0, order, stacked)

        if self.cache is not None and self.use_cache:
            for index in range(first, end):
                keys = merge([F.pad(c.layers[index].keys, left) for c, left in group_caches])
                values = merge([F.pad(c.layers[index].values, left) for c, left in group_caches])
                self.cache.update(keys, values, index)
        return merge(outputs), merge(last_inputs)
