"""The pyramid runtime: a Hugging Face decoder stack run segment by segment, shrinking in between.

``pyramid_forward`` replaces the ``forward`` of one model instance (see ``dpn.apply_pyramid``). It
embeds the batch with the model's own code, then loops over the stock decoder layers. The layers
between two stages form a *segment*. After each segment the strategy (``dpn.strategies``) plans new
tokens for each sample's images (pooled on their grid, or a selected subset), and ``shrink``
rebuilds the batch: each sample keeps its text tokens and its new visual tokens in order, padding
is dropped, and the batch is left-padded to its longest member (samples of similar length then run
together: ``length_groups``). A stage at layer -1 (projector-side compression) acts on the
embeddings, before the first layer. Attention masks (``create_causal_mask``) and rotary embeddings
are rebuilt per segment, labels travel with their tokens, and the ``PyramidCache`` keeps each
segment's layout for decoding. Everything about the call (routing, token counts, FLOPs) is returned in the output.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import slice_logits_to_keep

from dpn.cache import PyramidCache
from dpn.config import PyramidConfig
from dpn.flops import decoder_flops
from dpn.models import get_adapter
from dpn.outputs import PyramidCausalLMOutput, PyramidRouting
from dpn.spans import VisualSpans, find_visual_spans, ranks_within
from dpn.strategies import BudgetInputs, StageInput, StagePlan
from dpn.transfer import host_tensor

IGNORE_INDEX = -100
# Length grouping (``length_groups``): samples within 10% of their group's longest share a group;
# grouping is used when it cuts the token rows computed by at least 15%.
PADDING_TOLERANCE = 0.1
MIN_GROUPING_SAVING = 0.15
MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


@dataclass
class Chunk:
    """The tokens of one forward call, in the current (possibly shortened) layout."""

    hidden: torch.Tensor  # (batch, length, d)
    valid: torch.Tensor  # (batch, length) bool: real token, not padding
    positions: torch.Tensor  # (batch, length) rotary positions, before the cache's per-segment shift
    labels: torch.Tensor | None  # (batch, length)
    spans: VisualSpans
    router_index: torch.Tensor  # (batch,) position the router reads, -1 for none
    lengths: list[int] | None = None  # real tokens per sample, on the host (known once a stage has shrunk the batch)


def pyramid_forward(
    self,
    input_ids: torch.LongTensor | None = None,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    image_sizes: torch.Tensor | None = None,
    output_hidden_states: bool | None = None,
    output_attentions: bool | None = None,
    return_dict: bool | None = None,
    force_experts: Any = None,
    **kwargs: Any,
) -> PyramidCausalLMOutput | tuple:
    """Forward of a model with a pyramid; the arguments are those of the model's own forward.

    ``force_experts`` (testing and analysis) fixes the expert per sample and stage: an int, one int
    per stage, or a (batch, stages) tensor; -1 lets the router decide. Positions, when not given,
    are derived from ``attention_mask`` (so left padding does not shift them).
    """
    if output_attentions:
        raise ValueError(
            "output_attentions is not available with a pyramid (sequence lengths change between layers); "
            "call dpn.remove_pyramid(model) to inspect attention maps"
        )
    adapter = get_adapter(self)
    pyramid = self.pyramid
    config: PyramidConfig = pyramid.config
    text_config = adapter.text_config(self.config)
    decoder = adapter.decoder(self)
    vision_kwargs = {
        k: v
        for k, v in (
            ("vision_feature_layer", vision_feature_layer),
            ("vision_feature_select_strategy", vision_feature_select_strategy),
            ("image_sizes", image_sizes),
        )
        if v is not None
    }
    hidden, image_mask = adapter.embed(self, input_ids, inputs_embeds, pixel_values, **vision_kwargs)
    batch, length, _ = hidden.shape
    device = hidden.device
    num_segments = len(config.stages) + 1

    if use_cache is None:
        use_cache = bool(getattr(text_config, "use_cache", True)) and not self.training
    cache = _prepare_cache(past_key_values, use_cache, self.config, num_segments)
    past_length = cache.input_length() if cache is not None else 0

    valid = _chunk_validity(attention_mask, batch, length, past_length, device)
    positions = _input_positions(position_ids, attention_mask, batch, length, past_length, device)
    if labels is not None and labels.shape != (batch, length):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the inputs are {(batch, length)}")
    # As in the model's own forward, image tokens are visual only when the call brings images.
    has_images = pixel_values is not None
    spans = find_visual_spans(image_mask & valid, adapter.visual_grid(self.config)) if has_images else VisualSpans()
    forced = _forced_experts(force_experts, batch, pyramid, device)
    chunk = Chunk(
        hidden=hidden,
        valid=valid,
        positions=positions,
        labels=labels,
        spans=spans,
        router_index=(_router_index(config, input_ids, valid, labels, spans, pyramid.reads_query) if len(spans)
                      else _no_router(batch, device)),
    )

    layers = decoder.layers[: text_config.num_hidden_layers]
    layer_types = _layer_types(text_config)
    bounds = _segment_bounds(config, len(layers))
    prefill = length > 1 or len(spans) > 0  # decoding steps skip routing and bookkeeping
    track_shift = cache is not None and config.positions == "renumber" and len(spans) > 0
    input_last = positions.gather(1, _last_valid(valid)[:, None]).squeeze(1) if track_shift else None
    plans: list[StagePlan] = []
    visual_counts = [spans.tokens_per_sample(batch)]
    segment_queries, segment_keys = [], []
    all_hidden = (hidden,) if output_hidden_states else None
    reshaped = False
    last_layer_input, position_embeddings = None, None

    for segment, (first, end) in enumerate(bounds):
        if segment > 0 and len(chunk.spans):
            stage = segment - 1
            stage_layer = config.stages[stage].layer
            plan = pyramid.plan(stage, StageInput(
                hidden=chunk.hidden, spans=chunk.spans, query_index=chunk.router_index, valid=chunk.valid,
                forced=None if forced is None else forced[stage],
                layer=layers[stage_layer] if stage_layer >= 0 else None,
                layer_input=last_layer_input, position_embeddings=position_embeddings,
            ))
            plans.append(plan)
            chunk, changed = shrink(chunk, plan, config.positions)
            reshaped = reshaped or changed
            visual_counts.append(chunk.spans.tokens_per_sample(batch))
        shift = cache.shift(segment) if cache is not None else 0
        segment_positions = chunk.positions - (shift[:, None] if torch.is_tensor(shift) else shift)
        past_mask = (
            cache.past_mask(segment, batch, device)
            if cache is not None
            else torch.zeros(batch, 0, dtype=torch.bool, device=device)
        )
        key_mask = torch.cat([past_mask, chunk.valid], dim=1)
        position_embeddings = decoder.rotary_emb(chunk.hidden, segment_positions)
        groups = None
        if reshaped and all_hidden is None and past_mask.shape[1] == 0 and end > first and config.group_by_length:
            if all(layer_types[index] == "full_attention" for index in range(first, end)):
                groups = length_groups(chunk.lengths, chunk.valid.shape[1], device)
        if groups is not None:
            hidden_states, last_layer_input = _run_length_groups(
                self.config, text_config, layer_types, layers, (first, end), chunk, segment_positions, groups,
                cache, use_cache, decoder.rotary_emb, kwargs,
            )
        else:
            masks = _attention_masks(
                text_config, layer_types, first, end, chunk.hidden, key_mask, cache, segment_positions
            )
            hidden_states, last_layer_input, layer_outputs = _run_layers(
                layers, layer_types, (first, end), chunk.hidden, masks, position_embeddings, segment_positions,
                cache, use_cache, kwargs,
            )
            if all_hidden is not None:
                all_hidden += layer_outputs
        chunk = replace(chunk, hidden=hidden_states)
        if prefill:
            queries = chunk.valid.sum(1)
            segment_queries.append(queries)
            segment_keys.append(past_mask.sum(1) + queries)
        if cache is not None:
            new_shift = None
            if reshaped and track_shift:
                # Later tokens come with input positions; this segment's positions lag by what pooling removed.
                segment_last = chunk.positions.gather(1, _last_valid(chunk.valid)[:, None]).squeeze(1)
                new_shift = shift + (input_last - segment_last)
            cache.append(segment, chunk.valid, new_shift)

    hidden_states = decoder.norm(chunk.hidden)
    logits = adapter.lm_head(self)(slice_logits_to_keep(hidden_states, logits_to_keep))

    lm_loss = None
    if labels is not None:
        lm_loss = self.loss_function(
            logits=logits, labels=chunk.labels, vocab_size=text_config.vocab_size, **kwargs
        )
    routing_loss = None
    if plans and (labels is not None or pyramid.training):  # a loss term: not spent on plain inference
        visual = host_tensor(visual_counts[0], device)
        budget = BudgetInputs(text_config, len(layers), valid.sum(1) - visual, visual)
        routing_loss = pyramid.routing_loss(plans, budget)
    loss = lm_loss
    if lm_loss is not None and routing_loss is not None and pyramid.training:
        loss = lm_loss + config.routing_loss_weight * routing_loss

    routing = None
    if prefill:
        routing = _routing_record(text_config, config, plans, visual_counts, segment_queries, segment_keys, bounds)
    output = PyramidCausalLMOutput(
        loss=loss,
        logits=logits,
        past_key_values=cache if use_cache else None,
        hidden_states=all_hidden,
        lm_loss=lm_loss,
        routing_loss=routing_loss,
        routing=routing,
        labels=chunk.labels,
        attention_mask=chunk.valid.long(),
    )
    return output if return_dict is not False else output.to_tuple()


# ------------------------------------------------------------------------------------ shrinking
def shrink(chunk: Chunk, plan: StagePlan, position_mode: str) -> tuple[Chunk, bool]:
    """Replace the planned images with their new tokens; returns the new chunk and whether it shrank.

    When no image changes size (every chosen stride is 1x1) the tokens are replaced in place and
    the layout is kept. Otherwise every sample is rebuilt in order (text, new visual tokens, text),
    padding dropped, and the batch left-padded to its longest sample, so the last column holds
    every sample's last token (as ``generate`` expects).
    """
    if not plan.spans:
        return chunk, False
    batch, length, width = chunk.hidden.shape
    device = chunk.hidden.device
    spans = chunk.spans
    flat = chunk.hidden.reshape(batch * length, width)
    rows = plan.rows.to(flat.dtype)
    old_index = spans.token_index(plan.spans, length, device)
    new_sizes = [r * c for r, c in plan.grids]
    if all(spans.size(k) == n for k, n in zip(plan.spans, new_sizes)):
        hidden = flat.index_copy(0, old_index, rows).view(batch, length, width)
        return replace(chunk, hidden=hidden), False

    # Order every surviving token by (sample, position, rank inside a replaced image): a replaced
    # image's tokens sort where the image started, since its original tokens are gone.
    stride = length + 1
    removed = torch.zeros(batch * length, dtype=torch.bool, device=device).index_fill(0, old_index, True)
    kept = (chunk.valid.flatten() & ~removed).nonzero().squeeze(1)
    sizes = host_tensor(new_sizes, device)
    span_sample = host_tensor([spans.sample[k] for k in plan.spans], device)
    span_start = host_tensor([spans.start[k] for k in plan.spans], device)
    total = sum(new_sizes)
    row_sample = torch.repeat_interleave(span_sample, sizes, output_size=total)
    row_start = torch.repeat_interleave(span_start, sizes, output_size=total)
    row_key = (row_sample * stride + row_start) * stride + ranks_within(sizes, total)
    kept_sample = kept // length
    keys = torch.cat([(kept_sample * stride + kept % length) * stride, row_key])
    source = torch.cat([kept, batch * length + torch.arange(rows.shape[0], device=device)])
    owner = torch.cat([kept_sample, row_sample])
    order = torch.argsort(keys)
    source, owner = source[order], owner[order]

    counts = torch.zeros(batch, dtype=torch.long, device=device).index_add_(0, owner, torch.ones_like(owner))
    offsets = torch.cumsum(counts, 0) - counts
    rank = torch.arange(owner.shape[0], device=device) - offsets[owner]  # rank inside its sample
    padding_row = batch * length + rows.shape[0]
    slot = torch.full((padding_row,), -1, dtype=torch.long, device=device)  # source -> place in the sorted order
    slot[source] = torch.arange(owner.shape[0], device=device)

    first_rows = itertools.accumulate(new_sizes[:-1], initial=0)
    replaced = dict(zip(plan.spans, zip(first_rows, plan.grids)))
    first_source, grids = [], []
    for k in range(len(spans)):
        if k in replaced:
            row, grid = replaced[k]
            first_source.append(batch * length + row)
        else:
            first_source.append(spans.sample[k] * length + spans.start[k])
            grid = (spans.rows[k], spans.cols[k])
        grids.append(grid)
    # Each sample's new length and the rank of each image's first token, in one wait for the device.
    fetched = torch.cat([counts, rank[slot[host_tensor(first_source, device)]]]).tolist()
    new_counts, first_ranks = fetched[:batch], fetched[batch:]
    new_length = max(new_counts)
    starts = [new_length - new_counts[spans.sample[k]] + first_ranks[k] for k in range(len(spans))]

    column = new_length - counts[owner] + rank
    gather = torch.full((batch, new_length), padding_row, dtype=torch.long, device=device)
    gather[owner, column] = source
    hidden = torch.cat([flat, rows, flat.new_zeros(1, width)])[gather]
    valid = gather != padding_row
    # Each new token stands for one old token: itself, or its pooling window's first token.
    stands_for = torch.cat(
        [torch.arange(batch * length, device=device), plan.representatives, torch.zeros(1, dtype=torch.long, device=device)]
    )[gather]
    first_valid = valid.int().argmax(1)
    batch_index = torch.arange(batch, device=device)

    labels = None
    if chunk.labels is not None:
        labels = torch.where(valid, chunk.labels.flatten()[stands_for], IGNORE_INDEX)
        # With left padding the first token's label would be predicted from a pad; alone it has no predecessor.
        labels[batch_index, first_valid] = IGNORE_INDEX
    old_positions = chunk.positions.flatten()[stands_for]
    if position_mode == "keep":
        positions = torch.where(valid, old_positions, 0)
    else:
        start = old_positions[batch_index, first_valid]
        positions = torch.where(valid, start[:, None] + valid.long().cumsum(1) - 1, 0)

    new_spans = VisualSpans(
        sample=list(spans.sample), start=starts, rows=[g[0] for g in grids], cols=[g[1] for g in grids]
    )
    has_router = chunk.router_index >= 0
    router_source = batch_index * length + chunk.router_index.clamp(min=0)
    router_index = torch.where(has_router, column[slot[router_source]], -1)
    return Chunk(hidden, valid, positions, labels, new_spans, router_index, new_counts), True


def _run_layers(layers, layer_types, bounds, hidden, masks, position_embeddings, positions, cache, use_cache: bool,
                kwargs) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
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
            past_key_values=cache,
            use_cache=use_cache,
            **kwargs,
        )
        outputs += (hidden,)
    return hidden, layer_input, outputs


# ------------------------------------------------------------------------------ length groups
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


def _run_length_groups(model_config, text_config, layer_types, layers, bounds, chunk: Chunk, positions, groups,
                       cache, use_cache: bool, rotary, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one segment's layers group by group (see ``length_groups``); returns the segment's output
    and the last layer's input in the full left-padded layout, and fills ``cache`` as one call would."""
    first, end = bounds
    length = chunk.hidden.shape[1]
    outputs, last_inputs, group_caches = [], [], []
    for members, group_length in groups:
        window = slice(length - group_length, length)
        hidden = chunk.hidden[members, window]
        group_positions = positions[members, window]
        group_cache = DynamicCache(config=model_config) if cache is not None else None
        masks = _attention_masks(text_config, layer_types, first, end, hidden, chunk.valid[members, window],
                                 group_cache, group_positions)
        hidden, layer_input, _ = _run_layers(layers, layer_types, bounds, hidden, masks, rotary(hidden, group_positions),
                                             group_positions, group_cache, use_cache, kwargs)
        left = (0, 0, length - group_length, 0)  # pad the sequence dimension on the left
        outputs.append(F.pad(hidden, left))
        last_inputs.append(F.pad(layer_input, left))
        group_caches.append((group_cache, left))
    order = torch.cat([members for members, _ in groups])

    def merge(parts: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.cat(parts)
        return stacked.new_zeros(stacked.shape).index_copy(0, order, stacked)

    if cache is not None and use_cache:
        for index in range(first, end):
            keys = merge([F.pad(c.layers[index].keys, left) for c, left in group_caches])
            values = merge([F.pad(c.layers[index].values, left) for c, left in group_caches])
            cache.update(keys, values, index)
    return merge(outputs), merge(last_inputs)


# ------------------------------------------------------------------------------------- helpers
def _prepare_cache(past_key_values: Any, use_cache: bool, model_config: Any, num_segments: int):
    if isinstance(past_key_values, PyramidCache):
        if past_key_values.num_segments != num_segments:
            raise ValueError(
                f"this PyramidCache has {past_key_values.num_segments} segments but the pyramid has {num_segments}"
            )
        return past_key_values
    if past_key_values is not None:
        if past_key_values.get_seq_length() > 0:
            raise ValueError(
                f"past_key_values is a filled {type(past_key_values).__name__} from a model without this pyramid; "
                "its layers do not match the pyramid's layouts. Start from an empty cache or a PyramidCache."
            )
        return PyramidCache(config=model_config, num_segments=num_segments)
    return PyramidCache(config=model_config, num_segments=num_segments) if use_cache else None


def _chunk_validity(attention_mask, batch: int, length: int, past_length: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.ndim != 2:
        raise ValueError(f"a pyramid needs a 2D attention mask (batch, tokens), got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape != (batch, past_length + length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the cache holds {past_length} tokens and the "
            f"input has {length}: expected {(batch, past_length + length)}"
        )
    return attention_mask[:, past_length:].to(device=device, dtype=torch.bool)


def _input_positions(position_ids, attention_mask, batch: int, length: int, past_length: int, device):
    if position_ids is not None:
        if position_ids.ndim != 2:
            raise ValueError(f"position_ids must be (batch, tokens), got shape {tuple(position_ids.shape)}")
        return position_ids.to(device).expand(batch, -1)
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:].to(device)
    return torch.arange(past_length, past_length + length, device=device).expand(batch, -1)


def _last_valid(valid: torch.Tensor) -> torch.Tensor:
    length = valid.shape[1]
    return length - 1 - valid.flip(1).int().argmax(1)


def _no_router(batch: int, device) -> torch.Tensor:
    return torch.full((batch,), -1, dtype=torch.long, device=device)


def _router_index(config: PyramidConfig, input_ids, valid: torch.Tensor, labels, spans: VisualSpans,
                  required: bool) -> torch.Tensor:
    """Position whose hidden state each sample's routers (and FastV / PyramidDrop's ranking) read;
    with ``required``, every sample with an image must have one."""
    if config.router_input == "router_token":
        if input_ids is None:
            raise ValueError("router_input='router_token' needs input_ids to find the router token")
        is_router = (input_ids == config.router_token_id) & valid
        found = is_router.any(1)
        if required:  # checked once per call, not at every stage
            found_in = found.tolist()
            missing = sorted({b for b in spans.sample if not found_in[b]})
            if missing:
                raise ValueError(f"samples {missing} have an image but no router token (id {config.router_token_id}); "
                                 "add the router token to their prompts")
        return torch.where(found, _last_valid(is_router), -1)
    last = _last_valid(valid)
    if labels is None:
        return last
    # The last prompt token is the one before the first supervised token.
    supervised = (labels != IGNORE_INDEX) & valid
    has_answer = supervised.any(1)
    before_answer = (supervised.int().argmax(1) - 1).clamp(min=0)
    return torch.where(has_answer, before_answer, last)


def _forced_experts(force_experts: Any, batch: int, pyramid, device) -> list[torch.Tensor] | None:
    """Normalise ``force_experts`` to one (batch,) tensor per stage, checking ranges."""
    if force_experts is None:
        return None
    config = pyramid.config
    if config.selects_tokens:
        raise ValueError(f"force_experts applies to pooling strategies; {config.strategy} has no experts to force")
    stages = len(config.stages)
    forced = torch.as_tensor(force_experts, dtype=torch.long).cpu()  # checked on the host
    if forced.ndim == 0:
        forced = forced.expand(batch, stages)
    elif forced.ndim == 1:
        if forced.shape[0] != stages:
            raise ValueError(f"force_experts has {forced.shape[0]} entries but the pyramid has {stages} stages")
        forced = forced.expand(batch, stages)
    elif forced.shape != (batch, stages):
        raise ValueError(f"force_experts must be (batch, stages) = {(batch, stages)}, got {tuple(forced.shape)}")
    for stage in range(stages):
        column = forced[:, stage]
        choices = pyramid.num_choices(stage)
        if bool((column < -1).any()) or bool((column >= choices).any()):
            raise ValueError(
                f"force_experts for stage {stage} must be -1 (router decides) or an expert index in 0..{choices - 1}"
            )
    forced = host_tensor(forced.tolist(), device)  # a queued copy: the bench forces every timed forward
    return [forced[:, stage] for stage in range(stages)]


def _segment_bounds(config: PyramidConfig, num_layers: int) -> list[tuple[int, int]]:
    edges = [0, *(stage.layer + 1 for stage in config.stages), num_layers]
    return list(zip(edges[:-1], edges[1:]))


def _layer_types(text_config: Any) -> list[str]:
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        return list(layer_types)
    kind = "sliding_attention" if getattr(text_config, "sliding_window", None) is not None else "full_attention"
    return [kind] * text_config.num_hidden_layers


def _attention_masks(text_config, layer_types, first, end, hidden, key_mask, cache, positions) -> dict[str, Any]:
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
            past_key_values=cache,
            position_ids=positions,
            layer_idx=index,
        )
    return masks


def _routing_record(text_config, config, plans, visual_counts, segment_queries, segment_keys, bounds):
    """Per-sample record of a prefill; ``plans`` is empty when the batch had no images."""
    batch, device = segment_queries[0].shape[0], segment_queries[0].device
    stages = len(config.stages)

    def per_layer(per_segment: list[torch.Tensor]) -> torch.Tensor:
        columns = [tokens for tokens, (first, end) in zip(per_segment, bounds) for _ in range(first, end)]
        return torch.stack(columns, dim=1)

    layer_tokens = per_layer(segment_queries)
    layer_keys = per_layer(segment_keys)
    num_layers = layer_tokens.shape[1]
    vanilla_tokens = segment_queries[0][:, None].expand(-1, num_layers)
    vanilla_keys = segment_keys[0][:, None].expand(-1, num_layers)
    if plans:
        experts = torch.stack([p.experts for p in plans], dim=1)
        probability = torch.stack([p.expert_probability for p in plans], dim=1).detach()
        router_probs = [p.router_probs.detach() for p in plans]
    else:
        experts = torch.full((batch, stages), -1, dtype=torch.long, device=device)
        probability = torch.zeros(batch, stages, device=device)
        router_probs = [torch.zeros(batch, len(s.experts or ()), device=device) for s in config.stages]
        visual_counts = visual_counts * (stages + 1)
    return PyramidRouting(
        experts=experts,
        expert_probability=probability,
        router_probs=router_probs,
        visual_tokens=host_tensor(visual_counts, device).T,
        layer_tokens=layer_tokens,
        flops=decoder_flops(text_config, layer_tokens, layer_keys),
        vanilla_flops=decoder_flops(text_config, vanilla_tokens, vanilla_keys),
    )
