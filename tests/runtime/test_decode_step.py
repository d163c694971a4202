"""A decoding step with a pyramid: no reads of the device, and a cache that holds only what each segment kept."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import GRID, batch_of, make_prompt, pixels, tiny_llava

import dpn
from dpn.memory import cache_bytes, kv_bytes_per_token, kv_cache_bytes, largest_decoding_batch
from dpn.compat import cache_keyword, output_cache

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")


@contextlib.contextmanager
def counting_host_reads():
    """Counts the calls that copy a tensor's values to the host (a device synchronisation on a GPU):
    ``item``, ``tolist``, ``bool()``/``int()``/``float()`` of a tensor and ``nonzero``. (Indexing with
    a boolean tensor is not counted: patching ``__getitem__`` changes how torch.Tensor behaves as a
    sequence even after it is put back.)"""
    counts = {"reads": 0}
    names = HOST_READS
    inherited = {name: getattr(torch.Tensor, name) for name in names}
    own = {name: torch.Tensor.__dict__[name] for name in names if name in torch.Tensor.__dict__}

    def counted(name):
        def read(self, *args, **kwargs):
            counts["reads"] += 1
            return inherited[name](self, *args, **kwargs)
        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        yield counts
    finally:  # put back exactly what torch.Tensor had: its own methods, or none (then the base class's)
        for name in names:
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)


def _prefill(model, batch, forced):
    with torch.no_grad():
        return model(**batch, pixel_values=pixels(batch["input_ids"].shape[0]), use_cache=True, force_experts=forced)


def _step(model, batch, prefill):
    mask = torch.cat([batch["attention_mask"], torch.ones_like(batch["attention_mask"][:, :1])], 1)
    with torch.no_grad():
        return model(input_ids=prefill.logits[:, -1:].argmax(-1), attention_mask=mask,
                     **cache_keyword(output_cache(prefill)), use_cache=True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("positions", ["renumber", "keep"])
def test_a_decoding_step_reads_nothing_from_the_device(attn, positions):
    model = tiny_llava(attn=attn)
    batch = batch_of([make_prompt(3, 2), make_prompt(7, 1, seed=1)])
    vanilla = _prefill(model, batch, None)
    with counting_host_reads() as vanilla_reads:
        _step(model, batch, vanilla)
    assert vanilla_reads["reads"] > 0 or attn == "eager"  # the counter sees the stock mask builder's check

    dpn.apply_pyramid(model, dpn.presets.paper(model.config, positions=positions))
    prefill = _prefill(model, batch, [[2, 1, 0], [1, 2, 0]])  # the samples shrink differently: padded segments
    with counting_host_reads() as reads:
        step = _step(model, batch, prefill)
    assert reads["reads"] == 0
    assert torch.isfinite(step.logits).all()


def test_the_cache_holds_each_segments_kept_tokens_and_no_more():
    model = tiny_llava()
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    prompts = [make_prompt(3, 2), make_prompt(7, 1, seed=1)]
    batch = batch_of(prompts)
    prefill = _prefill(model, batch, [[2, 1, 0], [1, 0, 0]])
    routing, cache = prefill.routing, output_cache(prefill)
    text = torch.tensor([len(p) - GRID[0] * GRID[1] for p in prompts])
    bounds = [0, *(s.layer + 1 for s in model.pyramid.config.stages), model.config.text_config.num_hidden_layers]
    for segment, (first, end) in enumerate(zip(bounds, bounds[1:])):
        per_sample = text + routing.visual_tokens[:, segment]
        assert routing.layer_tokens[:, first].tolist() == per_sample.tolist()
        for layer in range(first, end):  # one left-padded row per sample, as long as its longest sample
            assert cache.layers[layer].keys.shape[2] == int(per_sample.max())
            assert cache.layers[layer].values.shape[2] == int(per_sample.max())
    assert [int(v) for v in routing.visual_tokens[0]] == [64, 16, 8, 8]  # 2x2, then 1x2, then kept


def test_kv_cache_bytes_count_what_the_cache_holds():
    model = tiny_llava()
    text_config = model.config.text_config
    batch = batch_of([make_prompt(3, 2)])
    vanilla = _prefill(model, batch, None)
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    pooled = _prefill(model, batch, [[2, 1, 0]])
    per_token = kv_bytes_per_token(text_config, torch.float32)
    assert per_token == 2 * text_config.num_key_value_heads * (text_config.hidden_size // 4) * 4
    length = batch["input_ids"].shape[1]
    layers = text_config.num_hidden_layers
    assert cache_bytes(output_cache(vanilla)) == layers * length * per_token
    computed = kv_cache_bytes(text_config, pooled.routing.layer_tokens, torch.float32)
    assert computed.tolist() == [cache_bytes(output_cache(pooled))]  # batch 1: no padding
    assert cache_bytes(output_cache(pooled)) < cache_bytes(output_cache(vanilla))
    grown = kv_cache_bytes(text_config, pooled.routing.layer_tokens[0].tolist(), torch.float32, new_tokens=5)
    step = _step(model, batch, pooled)
    assert cache_bytes(output_cache(step)) + 4 * layers * per_token == grown
    assert largest_decoding_batch(grown, 10 * grown + 1) == 10


@pytest.mark.parametrize("forced, distinct_shifts", [([[0, 0, 0]], 1), ([[2, 0, 0]], 2), ([[2, 1, 0]], 3), ([[1, 1, 1]], 4)])
def test_a_decoding_step_computes_every_segments_rotary_in_one_call(forced, distinct_shifts):
    """Segments after a stage that changed nothing share their position shift (one tensor, kept
    shared through beam reordering); a decoding step computes the rotary of all distinct shifts at once."""
    model = tiny_llava()
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    batch = batch_of([make_prompt(3, 2)])
    prefill = _prefill(model, batch, forced)
    cache = output_cache(prefill)
    cache.reorder_cache(torch.tensor([0]))
    shifts = [cache.shift(segment) for segment in range(cache.num_segments)]
    distinct = {id(shift) for shift in shifts}
    assert len(distinct) == distinct_shifts  # the unshifted input segment (0) counts as one
    rotary = model.model.language_model.rotary_emb
    calls, forward = [], rotary.forward
    rotary.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    try:
        step = _step(model, batch, prefill)
    finally:
        del rotary.forward
    assert len(calls) == 1
    # and the step computes what the whole sequence does uncached (the labels keep the routers' query)
    ids = torch.cat([batch["input_ids"], prefill.logits[:, -1:].argmax(-1)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    with torch.no_grad():
        uncached = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, pixel_values=pixels(1),
                         force_experts=forced, use_cache=False)
    torch.testing.assert_close(step.logits[:, -1], uncached.logits[:, -1], atol=1e-5, rtol=0)
