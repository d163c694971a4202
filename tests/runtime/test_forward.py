"""Invariants of the pyramid runtime (DESIGN.md section 4) on tiny random LLaVA models."""

from __future__ import annotations

import pytest
import torch

import dpn
from dpn.strategies.pooling import visual_tokens_after
from helpers import GRID, IMAGE_TOKEN_ID, batch_of, make_prompt, pixels, tiny_llava
from dpn.compat import cache_keyword, output_cache

MIXED_EXPERTS = [(1, 1), (1, 2), (2, 2)]


def pyramid_config(experts=MIXED_EXPERTS, layers=(1, 2, 4), **kwargs) -> dpn.PyramidConfig:
    """A DPN pyramid on the test model; ``kwargs`` go to the shared config or to DPN's."""
    stages = [dpn.PoolingStage(layer=l, experts=list(experts)) for l in layers]
    return dpn.presets.build({"stages": stages, "strategy": dpn.DPNConfig()}, **kwargs)


def valid_logits(out, row: int) -> torch.Tensor:
    return out.logits[row][out.attention_mask[row].bool()] if out.attention_mask is not None else out.logits[row]


# ----------------------------------------------------------------------------- 1. identity == vanilla
@pytest.mark.parametrize("backbone", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_identity_pyramid_matches_vanilla(backbone, attn):
    model = tiny_llava(backbone, attn)
    prompts = [make_prompt(3, 6, seed=1), make_prompt(3, 6, seed=2), make_prompt(5, 2, seed=3)]
    batch = batch_of(prompts, padding_side="right")
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[labels == IMAGE_TOKEN_ID] = -100
    images = pixels(3)
    with torch.no_grad():
        vanilla = model(**batch, pixel_values=images, labels=labels)
    dpn.apply_pyramid(model, pyramid_config(experts=[(1, 1)]))
    with torch.no_grad():
        pyramid = model(**batch, pixel_values=images, labels=labels)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(pyramid.logits[mask], vanilla.logits[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(pyramid.loss, vanilla.loss, atol=1e-5, rtol=0)
    assert pyramid.routing.visual_tokens.tolist() == [[64] * 4] * 3

    model.train()  # in training the total adds the (unreachable) routing hinge; the LM loss is unchanged
    with torch.no_grad():
        trained = model(**batch, pixel_values=images, labels=labels)
    torch.testing.assert_close(trained.lm_loss, vanilla.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(trained.loss, trained.lm_loss + 1e-3 * trained.routing_loss)


def test_remove_pyramid_restores_vanilla_exactly():
    model = tiny_llava()
    batch = batch_of([make_prompt(3, 4, seed=1)])
    images = pixels(1)
    with torch.no_grad():
        before = model(**batch, pixel_values=images).logits
        dpn.apply_pyramid(model, pyramid_config())
        pooled = model(**batch, pixel_values=images, force_experts=2).logits
        dpn.remove_pyramid(model)
        after = model(**batch, pixel_values=images).logits
    assert pooled.shape[1] < before.shape[1]
    assert torch.equal(before, after)
    assert not dpn.has_pyramid(model) and not any("pyramid" in k for k in model.state_dict())


def test_apply_patches_only_that_instance():
    model, other = tiny_llava(), tiny_llava()
    dpn.apply_pyramid(model, pyramid_config())
    assert "forward" in vars(model) and "forward" not in vars(other)
    assert not dpn.has_pyramid(other)


# ------------------------------------------------------------------------ 2. cached == recomputed
@pytest.mark.parametrize("positions", ["renumber", "keep"])
def test_generate_with_cache_matches_full_recompute(positions):
    model = tiny_llava(seed=3)
    dpn.apply_pyramid(model, pyramid_config(positions=positions))
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(7, 2, seed=2), make_prompt(1, 9, seed=3)])
    images = pixels(3)
    forced = torch.tensor([[1, 1, 2], [2, 0, 1], [-1, -1, -1]])  # the last sample follows its routers
    new_tokens = 16
    with torch.no_grad():
        generated = model.generate(
            **batch, pixel_values=images, force_experts=forced, max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompt_length = ids.shape[1]
    for step in range(new_tokens):
        # Labels mark the generated tokens as the answer, so the routers read the last prompt token.
        labels = torch.full_like(ids, -100)
        labels[:, prompt_length:] = ids[:, prompt_length:]
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=images, labels=labels,
                        force_experts=forced, use_cache=False)
        torch.testing.assert_close(out.logits[:, -1], generated.logits[step], atol=1e-4, rtol=0)
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
    assert torch.equal(ids, generated.sequences)
    assert len(set(generated.sequences[:, prompt_length:].flatten().tolist())) > 3  # not a degenerate stream


def test_generate_sampling_and_eos_stop():
    model = tiny_llava(seed=3)
    dpn.apply_pyramid(model, pyramid_config())
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(7, 2, seed=2)])
    with torch.no_grad():
        greedy = model.generate(**batch, pixel_values=pixels(2), max_new_tokens=8, do_sample=False, pad_token_id=0)
        eos = int(greedy[0, batch["input_ids"].shape[1]])  # the first greedy token of sample 0 as EOS
        stopped = model.generate(**batch, pixel_values=pixels(2), max_new_tokens=8, do_sample=False,
                                 pad_token_id=0, eos_token_id=eos)
        torch.manual_seed(0)
        sampled = model.generate(**batch, pixel_values=pixels(2), max_new_tokens=8, do_sample=True, top_k=0,
                                 pad_token_id=0)
    prompt = batch["input_ids"].shape[1]
    assert stopped[0, prompt] == eos and (stopped[0, prompt + 1:] == 0).all()
    assert sampled.shape == (2, prompt + 8)


# --------------------------------------------------------------------------- 3. batched == alone
def test_padded_batch_matches_each_sample_alone():
    model = tiny_llava(seed=4)
    vanilla_reference = tiny_llava(seed=4)
    dpn.apply_pyramid(model, pyramid_config())
    prompts = [
        make_prompt(2, 3, seed=1),
        make_prompt(9, 1, seed=2),
        make_prompt(4, 7, seed=3),
        make_prompt(1, 2, images=2, seed=4),  # two images in one sample
        [11, 12, 13, 14, 15, 16, 17],  # text only, inside an image batch
    ]
    image_counts = [1, 1, 1, 2, 0]
    forced = torch.tensor([[0, 0, 0], [1, 2, 0], [2, 2, 1], [2, 1, 1], [-1, -1, -1]])
    images = pixels(sum(image_counts))
    image_slices = torch.split(images, image_counts)
    for side in ("left", "right"):
        batch = batch_of(prompts, padding_side=side)
        with torch.no_grad():
            together = model(**batch, pixel_values=images, force_experts=forced)
        # Grids that fall below min_tokens_to_pool (16) are not routed at later stages (-1).
        assert together.routing.experts.tolist() == [[0, 0, 0], [1, 2, -1], [2, 2, -1], [2, 1, -1], [-1, -1, -1]]
        for row, prompt in enumerate(prompts):
            alone_batch = batch_of([prompt])
            with torch.no_grad():
                alone = model(**alone_batch, pixel_values=image_slices[row] if image_counts[row] else None,
                              force_experts=forced[row:row + 1])
            torch.testing.assert_close(valid_logits(together, row), alone.logits[0], atol=1e-4, rtol=0)
    # The text-only sample is untouched: identical to the model without a pyramid.
    with torch.no_grad():
        plain = vanilla_reference(**batch_of([prompts[-1]]))
    torch.testing.assert_close(valid_logits(together, 4), plain.logits[0], atol=1e-5, rtol=0)
    assert together.routing.experts[4].tolist() == [-1, -1, -1]


def test_batched_generation_matches_alone():
    model = tiny_llava(seed=5)
    dpn.apply_pyramid(model, pyramid_config())
    prompts = [make_prompt(2, 3, seed=1), make_prompt(9, 1, seed=2), make_prompt(4, 7, seed=3), make_prompt(6, 6, seed=4)]
    images = pixels(4)
    forced = torch.tensor([[0, 0, 0], [1, 2, 0], [2, 2, 1], [2, 1, 1]])
    with torch.no_grad():
        together = model.generate(**batch_of(prompts), pixel_values=images, force_experts=forced,
                                  max_new_tokens=10, do_sample=False, pad_token_id=0)
        for row, prompt in enumerate(prompts):
            alone = model.generate(**batch_of([prompt]), pixel_values=images[row:row + 1],
                                   force_experts=forced[row:row + 1], max_new_tokens=10, do_sample=False,
                                   pad_token_id=0)
            assert together[row, -10:].tolist() == alone[0, -10:].tolist()


# ------------------------------------------------------------------------ 4. sequences really shrink
@pytest.mark.parametrize("expert", [0, 1, 2])
def test_forced_expert_token_counts_follow_grid_arithmetic(expert):
    model = tiny_llava()
    config = pyramid_config()
    dpn.apply_pyramid(model, config)
    text_before, text_after = 3, 5
    batch = batch_of([make_prompt(text_before, text_after, seed=1)])
    with torch.no_grad():
        out = model(**batch, pixel_values=pixels(1), force_experts=expert, output_hidden_states=True)
    path = [stage.experts[expert] for stage in config.stages]
    expected_visual = visual_tokens_after(GRID, path, config.strategy.min_tokens_to_pool)
    assert out.routing.visual_tokens[0].tolist() == expected_visual
    text = text_before + 2 + text_after
    boundaries = [0, *(s.layer + 1 for s in config.stages), 6]
    expected_layers = []
    for segment, visual in enumerate(expected_visual):
        expected_layers += [text + visual] * (boundaries[segment + 1] - boundaries[segment])
    assert out.routing.layer_tokens[0].tolist() == expected_layers
    # hidden_states[i + 1] is the output of layer i: its length is what the layer really ran on.
    assert [h.shape[1] for h in out.hidden_states[1:]] == expected_layers
    assert out.logits.shape[1] == expected_layers[-1]
    if expert > 0:
        assert expected_layers[-1] < expected_layers[0]


def test_non_square_grid_pools_when_strides_divide():
    model = tiny_llava()
    dpn.apply_pyramid(model, pyramid_config(experts=[(1, 2), (2, 1)], layers=(1, 3)))
    batch = batch_of([make_prompt(2, 2, seed=1)])
    with torch.no_grad():
        out = model(**batch, pixel_values=pixels(1), force_experts=torch.tensor([[0, 0]]))
    # 8x8 -> (1x2) 8x4 -> (1x2) 8x2
    assert out.routing.visual_tokens[0].tolist() == [64, 32, 16]


# ------------------------------------------------------------------------------ 5. router training
def test_routers_get_gradients_in_training():
    model = tiny_llava()
    dpn.apply_pyramid(model, pyramid_config(routing_loss="none"))
    model.train()
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(6, 2, seed=2)])
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    torch.manual_seed(0)
    out = model(**batch, pixel_values=pixels(2), labels=labels)
    out.loss.backward()
    for router in model.pyramid.routers:
        # Only the LM loss flows here (no routing loss): through the probability scaling.
        assert router.up.weight.grad is not None and router.up.weight.grad.abs().sum() > 0
        assert router.down.weight.grad.abs().sum() > 0


def test_straight_through_scale_keeps_values_and_the_router_gradient():
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(6, 2, seed=2)])
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    forced = torch.tensor([[0, 1, 0], [1, 0, 1]])  # both images stay big enough to be routed at every stage
    outputs = {}
    for name, options in {"value": {}, "straight_through": {"probability_scale": "straight_through"},
                          "unscaled": {"probability_scale": "none"}}.items():
        model = tiny_llava()
        dpn.apply_pyramid(model, pyramid_config(routing_loss="none", **options))
        model.train()
        out = model(**batch, pixel_values=pixels(2), labels=labels, force_experts=forced)
        out.loss.backward()
        grads = [router.up.weight.grad for router in model.pyramid.routers]
        outputs[name] = (out.logits.detach(), grads)
    # straight-through: the values of the unscaled pyramid, the gradient path of the scaled one
    assert torch.allclose(outputs["straight_through"][0], outputs["unscaled"][0], atol=1e-6)
    assert not torch.allclose(outputs["value"][0], outputs["unscaled"][0], atol=1e-3)
    assert all(g is not None and g.abs().sum() > 0 for g in outputs["straight_through"][1])
    assert all(g is None or g.abs().sum() == 0 for g in outputs["unscaled"][1])


def test_train_only_scale_scales_in_training_and_not_at_inference():
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(6, 2, seed=2)])
    forced = torch.tensor([[0, 1, 0], [1, 0, 1]])
    logits = {}
    for name, options in {"value": {}, "train_only": {"probability_scale": "train_only"},
                          "unscaled": {"probability_scale": "none"}}.items():
        model = tiny_llava()
        dpn.apply_pyramid(model, pyramid_config(routing_loss="none", **options))
        with torch.no_grad():
            for mode in ("train", "eval"):
                model.train(mode == "train")
                logits[name, mode] = model(**batch, pixel_values=pixels(2), force_experts=forced).logits
    assert torch.allclose(logits["train_only", "train"], logits["value", "train"], atol=1e-6)
    assert torch.allclose(logits["train_only", "eval"], logits["unscaled", "eval"], atol=1e-6)
    assert not torch.allclose(logits["train_only", "eval"], logits["value", "eval"], atol=1e-3)


def test_training_samples_experts_and_inference_takes_argmax():
    model = tiny_llava()
    dpn.apply_pyramid(model, pyramid_config())
    with torch.no_grad():
        for router in model.pyramid.routers:
            router.up.weight.zero_()  # uniform probabilities
    batch = batch_of([make_prompt(3, 5, seed=s) for s in range(8)])
    with torch.no_grad():
        model.eval()
        inference = model(**batch, pixel_values=pixels(8)).routing.experts
        model.train()
        torch.manual_seed(0)
        training = model(**batch, pixel_values=pixels(8)).routing.experts
    assert (inference[:, 0] == 0).all()  # argmax of a uniform distribution is the first expert
    assert len(set(training[:, 0].tolist())) > 1


def test_routing_loss_matches_hand_computation():
    config = pyramid_config(layers=(1, 3))
    pyramid = dpn.strategies.DynamicPyramid(config, dpn.geometry_of(tiny_llava().config))
    stage0 = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])  # s*p: 2*0.5 = 1.0 and 0*0.6 = 0 -> mean 0.5
    stage1 = torch.tensor([[0.1, 0.1, 0.8]])  # 2*0.8 = 1.6 -> above the 1.5 target
    # per stage: max(0, 1.5 - 0.5) = 1.0 and max(0, 1.5 - 1.6) = 0; mean over stages = 0.5
    assert pyramid.hinge_loss([stage0, stage1]).item() == pytest.approx(0.5)
    # A stage nobody was routed at does not count.
    assert pyramid.hinge_loss([stage0, None]).item() == pytest.approx(1.0)


def test_training_loss_adds_weighted_routing_loss_with_gradient():
    model = tiny_llava()
    dpn.apply_pyramid(model, pyramid_config(routing_loss_weight=0.5))
    model.train()
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(6, 2, seed=2)])
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    out = model(**batch, pixel_values=pixels(2), labels=labels)
    expected = torch.stack([
        torch.relu(1.5 - (probs.max(-1).indices.float() * probs.max(-1).values).mean())
        for probs in out.routing.router_probs
    ]).mean()
    torch.testing.assert_close(out.routing_loss.detach(), expected)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.routing_loss)


def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward():
    """Checkpointed layers recompute their forward in the backward; through the pyramid's shortened
    segments that must give the loss and every gradient of the same step without checkpointing."""
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(7, 2, seed=2)])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :-3] = -100
    grads, losses = [], []
    for checkpointing in (False, True):
        model = tiny_llava()
        if checkpointing:  # the method's name since transformers 5.20 (gradient_checkpointing_* before)
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        dpn.apply_pyramid(model, pyramid_config())
        model.train()
        out = model(**batch, pixel_values=pixels(2), labels=labels, force_experts=[[2, 1, 0], [1, 2, 2]])
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and any("pyramid.routers" in name for name in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_labels_stay_aligned_with_their_tokens():
    model = tiny_llava()
    dpn.apply_pyramid(model, pyramid_config())
    prompts = [make_prompt(3, 5, seed=1), make_prompt(8, 2, seed=2)]
    batch = batch_of(prompts, padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[labels == IMAGE_TOKEN_ID] = -100
    with torch.no_grad():
        out = model(**batch, pixel_values=pixels(2), labels=labels, force_experts=2)
    for row, prompt in enumerate(prompts):
        text = [t for t in prompt if t != IMAGE_TOKEN_ID]
        kept = out.labels[row][out.labels[row] != -100].tolist()
        assert kept == text[1:]  # the first token has no predecessor and is never a target
    recomputed = model.loss_function(logits=out.logits, labels=out.labels, vocab_size=96)
    torch.testing.assert_close(out.loss, recomputed)


def test_beam_search_and_multiple_sequences_reorder_the_pyramid_cache():
    model = tiny_llava(seed=3)
    dpn.apply_pyramid(model, pyramid_config())
    prompts = [make_prompt(3, 5, seed=1), make_prompt(7, 2, seed=2)]
    images = pixels(2)
    forced = torch.tensor([[2, 1, 1], [1, 2, 0]])
    with torch.no_grad():
        beams = model.generate(**batch_of(prompts), pixel_values=images, force_experts=forced, max_new_tokens=6,
                               num_beams=3, do_sample=False, pad_token_id=0)
        alone = model.generate(**batch_of(prompts[1:]), pixel_values=images[1:], force_experts=forced[1:],
                               max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
        repeated = model.generate(**batch_of(prompts), pixel_values=images, max_new_tokens=4,
                                  num_return_sequences=2, do_sample=True, pad_token_id=0)
    assert beams[1, -6:].tolist() == alone[0, -6:].tolist()
    assert repeated.shape[0] == 4


def test_text_only_batch_passes_through_and_decoding_steps_skip_routing():
    model, vanilla = tiny_llava(seed=2), tiny_llava(seed=2)
    dpn.apply_pyramid(model, pyramid_config())
    batch = batch_of([[11, 12, 13, 14], [20, 21, 22, 23, 24, 25]])
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        expected = vanilla(**batch)
        step = model(input_ids=torch.tensor([[30], [31]]), **cache_keyword(output_cache(out)),
                     attention_mask=torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1))
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[mask], expected.logits[mask], atol=1e-5, rtol=0)
    assert (out.routing.experts == -1).all() and torch.allclose(out.routing.flops_ratio, torch.ones(2, dtype=torch.float64))
    assert step.routing is None and step.logits.shape == (2, 1, 96)


# ------------------------------------------------------------------------ length groups after a stage
def test_length_groups_split_only_when_it_saves():
    from dpn.runtime.segments import length_groups

    cpu = torch.device("cpu")
    groups = length_groups([100, 52, 95, 50, 25], 100, cpu)
    assert [(members.tolist(), length) for members, length in groups] == [([0, 2], 100), ([1, 3], 52), ([4], 25)]
    assert length_groups([100, 97, 92], 100, cpu) is None  # one group: nothing to gain
    assert length_groups([100, 100, 100, 80], 100, cpu) is None  # saves under 15% of the rows


def test_length_groups_give_the_same_results_as_one_padded_batch(monkeypatch):
    import dpn.runtime.segments

    calls = []
    runner = dpn.runtime.segments.SegmentRunner
    original = runner.run_length_groups
    monkeypatch.setattr(runner, "run_length_groups", lambda *a, **k: calls.append(1) or original(*a, **k))
    prompts = [make_prompt(2, 3, seed=1), make_prompt(9, 1, seed=2), make_prompt(4, 7, seed=3), make_prompt(6, 6, seed=4)]
    batch = batch_of(prompts)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[labels == IMAGE_TOKEN_ID] = -100
    forced = torch.tensor([[0, 0, 0], [1, 2, 0], [2, 2, 1], [2, 1, 1]])
    results = {}
    for grouped in (True, False):
        model = tiny_llava(seed=5)
        dpn.apply_pyramid(model, pyramid_config(group_by_length=grouped))
        out = model(**batch, pixel_values=pixels(4), labels=labels, force_experts=forced)
        out.loss.backward()
        with torch.no_grad():
            generated = model.generate(**batch, pixel_values=pixels(4), force_experts=forced, max_new_tokens=8,
                                       do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        grad = model.model.language_model.layers[3].mlp.up_proj.weight.grad
        results[grouped] = (out, grad, generated)
        if grouped:
            assert calls, "the grouped path did not run"
            calls.clear()
        else:
            assert not calls
    (a, grad_a, gen_a), (b, grad_b, gen_b) = results[True], results[False]
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-5, rtol=1e-4)
    assert torch.equal(gen_a.sequences, gen_b.sequences)
    torch.testing.assert_close(torch.stack(gen_a.logits), torch.stack(gen_b.logits), atol=1e-4, rtol=0)


def test_a_missing_router_token_fails_only_for_strategies_that_read_it():
    router_token = 9
    batch = batch_of([make_prompt(2, 2) + [router_token, 30], make_prompt(3, 1)])  # the second has no token
    model = tiny_llava()
    for spec in ("static:2x2", "fastv:0.5", "paper"):
        config = dpn.presets.from_spec(spec, model.config)
        config = dpn.PyramidConfig.from_dict({**config.to_dict(), "router_input": "router_token",
                                              "router_token_id": router_token})
        dpn.apply_pyramid(model, config)
        with torch.no_grad():
            if spec == "static:2x2":
                assert model(**batch, pixel_values=pixels(2)).logits.shape[0] == 2
            else:
                with pytest.raises(ValueError, match=r"samples \[1\] have an image but no router token"):
                    model(**batch, pixel_values=pixels(2))
        dpn.remove_pyramid(model)


def test_a_stride_one_stage_without_scaling_copies_no_token():
    """A kept (1x1) grid whose tokens are not scaled is left where it is: the plan replaces nothing,
    so the stage neither copies the tokens nor rebuilds the layout. With the paper's scaling the
    kept tokens are multiplied by the expert's probability and so are replaced."""
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(6, 2, seed=2)])
    forced = torch.tensor([[0, 2, 0], [0, 1, 0]])
    replaced = {}
    for scale in ("none", "value"):
        model = tiny_llava()
        dpn.apply_pyramid(model, pyramid_config(probability_scale=scale))
        plans, plan = [], model.pyramid.plan
        model.pyramid.plan = lambda stage, inputs: plans.append(plan(stage, inputs)) or plans[-1]
        with torch.no_grad():
            out = model(**batch, pixel_values=pixels(2), force_experts=forced)
        replaced[scale] = [sorted(p.spans) for p in plans]
        assert out.routing.visual_tokens.tolist() == [[64, 64, 16, 16], [64, 64, 32, 32]]
    assert replaced["none"] == [[], [0, 1], []]
    assert replaced["value"] == [[0, 1], [0, 1], [0, 1]]


def test_segments_on_an_unchanged_layout_reuse_the_masks():
    """The attention masks are built once per layout: a stage that changed nothing hands its masks on."""
    from dpn.runtime import segments

    model = tiny_llava()
    dpn.apply_pyramid(model, pyramid_config())
    batch = batch_of([make_prompt(3, 5, seed=1)])
    builder, built = segments.MASK_FUNCTIONS["full_attention"], []
    segments.MASK_FUNCTIONS["full_attention"] = lambda **kwargs: built.append(1) or builder(**kwargs)
    counts = {}
    try:
        for name, forced in {"all kept": 0, "first pools": [[2, 0, 0]], "all pool": [[1, 1, 1]]}.items():
            built.clear()
            with torch.no_grad():
                model(**batch, pixel_values=pixels(1), force_experts=forced)
            counts[name] = len(built)
    finally:
        segments.MASK_FUNCTIONS["full_attention"] = builder
    assert counts == {"all kept": 1, "first pools": 2, "all pool": 4}
