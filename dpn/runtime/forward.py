"""The pyramid forward: a Hugging Face decoder stack run segment by segment, shrinking in between.

``PyramidForward`` replaces the ``forward`` of one model instance (see ``dpn.apply_pyramid``) and
keeps the stock forward's signature. The family's adapter prepares the batch (embeddings, visual
grids, positions); then the stock decoder layers run in *segments*, the layers between two stages.
After each segment the strategy plans new tokens for each sample's grids and ``shrink`` rebuilds
the batch. Masks, rotary embeddings, labels and the ``PyramidCache`` follow the new layout. What
the call did (routing, token counts, FLOPs) is returned in the output, never kept on the model.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from dpn.compat import cache_keyword, slice_logits_to_keep
from dpn.models import CallInputs, get_adapter
from dpn.outputs import PyramidCausalLMOutput
from dpn.runtime.inputs import (
    LOSS_ARGUMENTS, CallArguments, chunk_validity, forced_experts, last_valid, no_query, query_index, router_tokens,
)
from dpn.runtime.layout import BatchLayout, shrink
from dpn.runtime.record import routing_record
from dpn.runtime.segments import SegmentRunner, layer_types_of, prepare_cache, segment_bounds
from dpn.strategies.base import BEFORE_FIRST_LAYER, InputLayout, StageInput, TokenCounts
from dpn.transfer import host_tensor

# The keyword under which generate() hands over images it encoded before the prefill.
PRE_ENCODED_IMAGES = "mm_encoder_outputs"


class PyramidForward:
    """The ``forward`` of one model instance with a pyramid: the stock forward's signature (so
    ``generate`` and the Trainer see the arguments they expect) plus ``force_experts``, less the
    stock arguments nobody here consumes (``generate`` then does not prepare them)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        stock = inspect.signature(type(model).forward.__get__(model))
        known = CallArguments.names() | set(get_adapter(model).input_names) | set(LOSS_ARGUMENTS)
        if model.pyramid.reads_vision_cues:  # generate() then passes the pixels, so the adapter encodes them
            known = known - {PRE_ENCODED_IMAGES}
        parameters = [p for p in stock.parameters.values() if p.kind is not p.VAR_KEYWORD and p.name in known]
        extra = [p for p in stock.parameters.values() if p.kind is p.VAR_KEYWORD]
        force = inspect.Parameter("force_experts", inspect.Parameter.KEYWORD_ONLY, default=None)
        self.__signature__ = stock.replace(parameters=[*parameters, force, *extra])

    def __call__(self, *args: Any, **kwargs: Any) -> PyramidCausalLMOutput | tuple:
        if not args:  # keywords only (generate, the Trainer): binding would give the same dict, slower
            return pyramid_forward(self.model, **kwargs)
        bound = self.__signature__.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        for parameter in self.__signature__.parameters.values():
            if parameter.kind is parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(parameter.name, {}))
        return pyramid_forward(self.model, **arguments)


def pyramid_forward(model: torch.nn.Module, force_experts: Any = None, **arguments: Any) -> PyramidCausalLMOutput | tuple:
    """Forward of a model with a pyramid; ``arguments`` are those of the model's own forward.

    ``force_experts`` (testing and analysis) fixes the expert per sample and stage: an int, one int
    per stage, or a (batch, stages) tensor; -1 lets the router decide. Decoding steps ignore it.
    """
    adapter, strategy = get_adapter(model), model.pyramid
    config, geometry = strategy.config, strategy.geometry
    call = CallArguments.sort(arguments, adapter.input_names)
    use_cache = call.use_cache
    if use_cache is None:
        use_cache = bool(getattr(geometry.text_config, "use_cache", True)) and not model.training
    cache = prepare_cache(call.cache, use_cache, model.config, len(config.stages) + 1)
    past_length = cache.input_length() if cache is not None else 0
    tokens = call.input_ids if call.input_ids is not None else call.inputs_embeds
    (batch, length), device = tokens.shape[:2], tokens.device
    valid = chunk_validity(call.attention_mask, batch, length, past_length, device)
    prepared = adapter.prepare(model, CallInputs(call.input_ids, call.inputs_embeds, call.position_ids,
                                                 call.attention_mask, valid, past_length, call.family, geometry,
                                                 cache, vision_cues=strategy.reads_vision_cues))
    if call.labels is not None and call.labels.shape != (batch, length):
        raise ValueError(f"labels have shape {tuple(call.labels.shape)} but the inputs are {(batch, length)}")
    spans = prepared.spans
    prefill = length > 1 or len(spans) > 0  # decoding steps skip routing and bookkeeping
    is_router = router_tokens(config, call.input_ids, valid) if len(spans) else None
    query = (query_index(config, is_router, valid, call.labels, spans, strategy.reads_query) if len(spans)
             else no_query(batch, device))
    mean_over = is_router if config.averages_router_tokens else None  # what DPN's routers average
    layout = BatchLayout(prepared.hidden, valid, prepared.positions, call.labels, spans, query, mean_over)
    forced = forced_experts(force_experts, batch, strategy, device) if prefill else None
    track_shift = cache is not None and config.positions == "renumber" and len(spans) > 0
    decoder = adapter.decoder(model)
    layers = list(decoder.layers)[: geometry.num_layers]  # a plain list: slicing a ModuleList builds a new module
    runner = SegmentRunner(
        model.config, geometry.text_config, decoder, layers, layer_types_of(geometry.text_config), adapter.positions,
        cache, use_cache, prepared.layer_arguments, config.group_by_length, bool(call.output_hidden_states),
        adapter.positions.at(layout.positions, last_valid(valid)) if track_shift else None, record=prefill,
    )

    first_input = InputLayout(layout.hidden, layout.spans, layout.query_index)
    bounds = segment_bounds(config, len(layers))
    plans, visual_counts, queries, keys = [], [spans.tokens_per_sample(batch)], [], []
    all_hidden = (layout.hidden,) if call.output_hidden_states else None
    reshaped, previous = False, None
    for segment, segment_layers in enumerate(bounds):
        if segment > 0 and len(layout.spans):
            stage = segment - 1
            # The cues describe the input layout: only a stage before the first layer sees it.
            cues = prepared.vision_cues if config.stages[stage].layer == BEFORE_FIRST_LAYER else None
            plan = strategy.plan(stage, _stage_input(layout, previous, None if forced is None else forced[stage],
                                                     decoder, layers, config.stages[stage].layer, cues,
                                                     first_input))
            plans.append(plan)
            layout, changed = shrink(layout, plan, config.positions, adapter.positions)
            reshaped = reshaped or changed
            visual_counts.append(layout.spans.tokens_per_sample(batch))
        previous = runner.run(segment, segment_layers, layout, reshaped)
        layout = previous.layout
        if all_hidden is not None:
            all_hidden += previous.layer_outputs
        if prefill:
            queries.append(previous.queries)
            keys.append(previous.keys)

    logits = adapter.lm_head(model)(slice_logits_to_keep(decoder.norm(layout.hidden), call.logits_to_keep))
    loss, lm_loss, auxiliary = _losses(model, strategy, call, logits, layout.labels, plans, valid, visual_counts[0])
    output = PyramidCausalLMOutput(
        loss=loss,
        logits=logits,
        **cache_keyword(cache if use_cache else None),
        hidden_states=all_hidden,
        lm_loss=lm_loss,
        routing_loss=auxiliary,
        routing=(routing_record(geometry.text_config, strategy, plans, visual_counts, queries, keys, bounds)
                 if prefill else None),
        labels=layout.labels,
        attention_mask=layout.valid.long(),
        position_ids=layout.positions,
    )
    return output if call.return_dict is not False else output.to_tuple()


def _stage_input(layout: BatchLayout, previous, forced, decoder, layers, stage_layer: int, vision_cues,
                 first_input: InputLayout) -> StageInput:
    """What a strategy sees at a stage: the current layout and the stage layer's input and rotary."""
    return StageInput(vision_cues=vision_cues, first_input=first_input,
        hidden=layout.hidden, spans=layout.spans, query_index=layout.query_index, valid=layout.valid, forced=forced,
        router_tokens=layout.router_tokens,
        layer=layers[stage_layer] if stage_layer >= 0 else None, layer_input=previous.last_layer_input,
        position_embeddings=previous.position_embeddings, decoder=decoder, labels=layout.labels,
    )


def _losses(model, strategy, call: CallArguments, logits, labels, plans, valid: torch.Tensor,
            visual_tokens: list[int]):
    """(loss, LM loss, the strategy's auxiliary loss); ``valid`` (the input's real tokens) and
    ``visual_tokens`` (a host list per sample) count each sample's tokens before the first stage."""
    lm_loss = None
    if call.labels is not None:
        vocab_size = strategy.geometry.text_config.vocab_size
        lm_loss = model.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **call.loss)
    auxiliary = None
    if plans and (call.labels is not None or strategy.training):  # a loss term: not spent on plain inference
        visual = host_tensor(visual_tokens, valid.device)
        auxiliary = strategy.auxiliary_loss(plans, TokenCounts(text=valid.sum(1) - visual, visual=visual))
    loss = lm_loss
    if lm_loss is not None and strategy.training:
        loss = strategy.total_loss(lm_loss, auxiliary)
    return loss, lm_loss, auxiliary
