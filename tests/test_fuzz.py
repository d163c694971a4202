"""Property-based: random pyramid configs (valid and invalid) x random batches (lengths, padding side,
images per sample, text-only rows) on a tiny LLaVA either run with the invariants holding or raise a
ValueError: never another exception, never a silent wrong shape."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from hypothesis import event, given, settings, strategies as st

import dpn
from dpn.strategies.dpn import MAX_ROUTER_BIAS
from helpers import GRID, batch_of, make_prompt, pixels, tiny_llava

LAYERS = 6
VISUAL_TOKENS = GRID[0] * GRID[1]

fractions = st.one_of(st.floats(min_value=-0.25, max_value=1.25), st.just(float("nan")), st.just(float("inf")))
specs = st.one_of(
    st.sampled_from(["paper", "random", "static:2x2", "static:4x4", "static:3x3", "projector:2x2", "static:0x2",
                     "none", "dpn", "fastv", "pdrop", "dart", "budget:0.5", "unknown:1"]),
    st.builds("fastv:{}".format, fractions),
    st.builds("pdrop:{}".format, fractions),
    st.builds("dart:{}".format, fractions),
    st.builds("static:{}x{}".format, st.integers(-2, 4), st.integers(-2, 4)),
    st.builds("projector:{}x{}".format, st.integers(-2, 4), st.integers(-2, 4)),
)
# Mostly valid, sometimes not: a zero or negative stride, a layer past the last, no experts, no stages.
strides = st.tuples(st.integers(-2, 4), st.integers(-1, 4))
raw_stages = st.lists(st.tuples(st.integers(0, LAYERS), st.lists(strides, min_size=0, max_size=3)),
                      min_size=0, max_size=3)
samples = st.lists(st.tuples(st.integers(0, 5), st.integers(1, 5), st.integers(0, 2)), min_size=1, max_size=3)


@lru_cache(maxsize=1)
def model():
    return tiny_llava(layers=LAYERS, seed=0)


def _pyramid(spec: str | None, stages: list, positions: str):
    if spec is not None:
        return dpn.presets.from_spec(spec, model().config)
    return dpn.PyramidConfig(stages=[dpn.PoolingStage(layer, list(experts)) for layer, experts in stages],
                             strategy=dpn.DPNConfig(), positions=positions)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(spec=st.one_of(st.none(), specs), stages=raw_stages, positions=st.sampled_from(["renumber", "keep", "spiral"]),
       rows=samples, side=st.sampled_from(["left", "right"]), route_seed=st.integers(0, 2**16))
def test_random_configs_and_batches_hold_the_invariants_or_raise_value_error(spec, stages, positions, rows, side,
                                                                            route_seed):
    llava = model()
    try:
        pyramid = _pyramid(spec, stages, positions)
        if pyramid is None:  # "none"
            return
        dpn.apply_pyramid(llava, pyramid)
    except ValueError:
        event("refused at apply_pyramid")
        return
    try:
        prompts = [make_prompt(before, after, images, seed=i) for i, (before, after, images) in enumerate(rows)]
        batch = batch_of(prompts, padding_side=side)
        images = sum(r[2] for r in rows)
        if images:
            batch["pixel_values"] = pixels(images, seed=route_seed)
        strategy = dpn.get_pyramid(llava)
        choices = [strategy.num_choices(stage) for stage in range(len(pyramid.stages))]
        g = torch.Generator().manual_seed(route_seed)
        forced = None  # strategies without experts to choose from (selection, static) route nothing
        if max(choices) > 1:
            forced = torch.stack([torch.randint(0, n, (len(rows),), generator=g) for n in choices], 1)
        with torch.no_grad():
            together = llava(**batch, force_experts=forced)
        # The output is the shortened sequence, with its own attention mask.
        valid = together.attention_mask.bool()
        vocab = llava.config.text_config.vocab_size
        assert together.logits.shape == (*valid.shape, vocab) and valid.shape[0] == len(rows)
        assert valid.sum(1).tolist() <= [len(p) for p in prompts] and torch.isfinite(together.logits[valid]).all()
        kept = together.routing.visual_tokens if together.routing is not None else torch.zeros(len(rows), 1)
        assert kept[:, 0].tolist() == [r[2] * VISUAL_TOKENS for r in rows]
        assert (kept[:, 1:] <= kept[:, :-1]).all()  # stages never add visual tokens
        first = 0
        for row, prompt in enumerate(prompts):
            alone = batch_of([prompt])
            if rows[row][2]:
                alone["pixel_values"] = batch["pixel_values"][first:first + rows[row][2]]
            first += rows[row][2]
            with torch.no_grad():
                single = llava(**alone, force_experts=None if forced is None else forced[row:row + 1])
            torch.testing.assert_close(together.logits[row][valid[row]], single.logits[0][single.attention_mask[0].bool()],
                                       atol=1e-4, rtol=0)
            if together.routing is not None and single.routing is not None:
                assert single.routing.visual_tokens[0].tolist() == kept[row].tolist()
        event("ran, invariants held")
    except ValueError:
        event("refused at the forward")
        return
    finally:
        dpn.remove_pyramid(llava)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(bias=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-2 * MAX_ROUTER_BIAS, 2 * MAX_ROUTER_BIAS),
                      st.integers(-50, 50)),
       route_seed=st.integers(0, 2**16))
def test_any_router_bias_is_refused_unless_finite_and_a_finite_one_runs(bias, route_seed):
    """A bias within ±MAX_ROUTER_BIAS runs with finite logits and never more visual tokens after a stage
    than before; NaN, infinities and larger values are refused (a NaN bias would keep every token
    without a word)."""
    llava = model()
    dpn.apply_pyramid(llava, dpn.presets.paper(llava.config))
    try:
        try:
            dpn.set_router_bias(llava, bias)
        except ValueError:
            assert not (math.isfinite(bias) and abs(bias) <= MAX_ROUTER_BIAS)
            assert dpn.get_router_bias(llava) == 0.0
            event("refused")
            return
        assert abs(bias) <= MAX_ROUTER_BIAS and dpn.get_router_bias(llava) == float(bias)
        batch = batch_of([make_prompt(2, 3, seed=route_seed % 7), make_prompt(4, 1, seed=1)])
        with torch.no_grad():
            out = llava(**batch, pixel_values=pixels(2, seed=route_seed))
        kept = out.routing.visual_tokens
        assert torch.isfinite(out.logits[out.attention_mask.bool()]).all()
        assert (kept[:, 1:] <= kept[:, :-1]).all()
        event("ran")
    finally:
        dpn.remove_pyramid(llava)
