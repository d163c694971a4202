"""The overhead measurement's pass-through layers: they change nothing but the layers, and give them back."""

from __future__ import annotations

import math

import torch
from helpers import batch_of, make_prompt, pixels, tiny_llava

import dpn
from dpn.lab.bench import runtime_overhead
from dpn.lab.engine.overhead import PassThroughLayer, layers_passed_through
from dpn.compat import output_cache


def _forward(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, pixel_values=pixels(batch["input_ids"].shape[0]), use_cache=True, **kwargs)


def test_passed_through_layers_leave_the_work_around_them_and_are_given_back():
    model = tiny_llava()
    batch = batch_of([make_prompt(3, 2), make_prompt(5, 1, seed=1)])
    decoder = model.model.language_model
    originals = list(decoder.layers)
    before = _forward(model, batch).logits
    with layers_passed_through(model):
        assert all(isinstance(layer, PassThroughLayer) for layer in decoder.layers)
        out = _forward(model, batch)
        embeds = model.model.get_input_embeddings()(batch["input_ids"])
        # without layers the logits are the head's reading of the embeddings (text positions; images merged in)
        text = batch["input_ids"] != model.config.image_token_id
        expected = model.lm_head(decoder.norm(embeds))
        torch.testing.assert_close(out.logits[text], expected[text])
        # the cache keeps each layer's length (rows one number wide): the next step's masks see the real past
        assert output_cache(out).get_seq_length() == batch["input_ids"].shape[1]
        assert output_cache(out).layers[0].keys.shape[-1] == 1
        assert decoder.layers[0].self_attn is originals[0].self_attn  # strategies that rank read the real weights
    assert list(decoder.layers) == originals
    torch.testing.assert_close(_forward(model, batch).logits, before)


def test_a_pyramid_decodes_through_passed_through_layers_and_the_overhead_is_measured():
    model = tiny_llava()
    batch = batch_of([make_prompt(3, 2), make_prompt(5, 1, seed=1)])
    batch["pixel_values"] = pixels(2)
    for spec in ("pdrop:0.5", None):  # PyramidDrop ranks with a layer's own projections
        dpn.apply_pyramid(model, dpn.presets.from_spec(spec, model.config) if spec else dpn.presets.paper(model.config))
        forced = None if spec else [[2, 1, 0], [1, 0, 0]]
        overhead = runtime_overhead(model, batch, forced, steps=2, repeats=1, warmup=0, device=torch.device("cpu"))
        assert set(overhead) == {"overhead_prefill_ms", "overhead_decode_step_us", "around_layers_prefill_ms",
                                 "around_layers_decode_step_us"}
        assert all(math.isfinite(value) for value in overhead.values())
        assert overhead["around_layers_prefill_ms"] > 0 and overhead["around_layers_decode_step_us"] > 0
        assert not any(isinstance(layer, PassThroughLayer) for layer in model.model.language_model.layers)
        dpn.remove_pyramid(model)
