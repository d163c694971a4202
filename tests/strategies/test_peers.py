"""The peer strategies (static, random, projector, fastv, pdrop, dart, divprune, vispruner, visionzip, sparsevlm,
cdpruner) in the pyramid runtime."""

from __future__ import annotations

import pytest
import torch

import dpn
from dpn.attention import query_attention
from dpn.spans import find_visual_spans
from dpn.strategies import AttentionSelection, StageInput
from dpn.strategies.selection import kept_count
from helpers import GRID, IMAGE_TOKEN_ID, batch_of, check_cached_generation_matches_recompute, make_prompt, pixels, \
    qwen_forward, tiny_llava, tiny_qwen_vl

VISUAL = GRID[0] * GRID[1]  # 64 tokens per image in the test model


def peer_configs(model) -> dict[str, dpn.PyramidConfig]:
    """One config per peer strategy on the 6-layer test model."""
    return {
        "static": dpn.presets.static(model.config, (2, 2)),
        "random": dpn.presets.random(model.config),
        "projector": dpn.presets.projector(model.config, (2, 2)),
        "fastv": dpn.presets.fastv(model.config, keep_ratio=0.3),
        "pdrop": dpn.PyramidConfig(strategy=dpn.PDropConfig(), stages=[
            dpn.SelectionStage(1, keep_ratio=0.5), dpn.SelectionStage(3, keep_ratio=0.5)]),
        "dart": dpn.presets.from_spec("dart:0.3", model),
        "divprune": dpn.presets.from_spec("divprune:0.3", model),
        "vispruner": dpn.presets.from_spec("vispruner:0.3", model),
        "visionzip": dpn.presets.from_spec("visionzip:0.3", model),
        "sparsevlm": dpn.presets.from_spec("sparsevlm", model),
        "cdpruner": dpn.presets.from_spec("cdpruner:0.3", model),
    }


PEERS = ["static", "random", "projector", "fastv", "pdrop", "dart", "divprune", "vispruner", "visionzip", "sparsevlm",
         "cdpruner"]


def expected_visual_tokens(name: str) -> list[int]:
    """Visual tokens of one image before the first stage and after each, from each strategy's definition."""
    if name == "static":  # 8x8 -> 4x4 -> 2x2; the 4-token grid is below min_tokens_to_pool and stays
        return [VISUAL, 16, 4, 4]
    if name == "projector":
        return [VISUAL, 16]
    if name in ("fastv", "dart", "divprune", "vispruner", "visionzip", "cdpruner"):
        return [VISUAL, kept_count(VISUAL, 0.3)]
    if name == "pdrop":
        return [VISUAL, 32, 16]
    if name == "sparsevlm":  # 33 / 22 / 12 kept of the original 64, plus 2 / 1 / 1 recycled
        return [VISUAL, 35, 23, 13]
    raise KeyError(name)


@pytest.mark.parametrize("name", ["static", "projector", "fastv", "pdrop", "dart", "divprune", "vispruner", "visionzip",
                                  "sparsevlm", "cdpruner"])
def test_kept_tokens_follow_the_definition(name):
    model = tiny_llava(seed=1)
    config = peer_configs(model)[name]
    dpn.apply_pyramid(model, config)
    batch = batch_of([make_prompt(3, 4, seed=1), make_prompt(6, 2, seed=2)])
    with torch.no_grad():
        out = model(**batch, pixel_values=pixels(2))
    expected = expected_visual_tokens(name)
    assert out.routing.visual_tokens.tolist() == [expected] * 2
    text = batch["attention_mask"].sum(1) - VISUAL
    layer_tokens = out.routing.layer_tokens
    first = config.stages[0].layer + 1  # layers before the first stage see everything
    assert (layer_tokens[:, :first] == (text + VISUAL)[:, None]).all()
    assert (layer_tokens[:, -1] == text + expected[-1]).all()  # and the last layer what the last stage left
    assert (out.routing.flops_ratio < 1).all()
    hidden = out.logits.shape[1]
    assert hidden == int((text + expected[-1]).max())  # the sequence really shrank


def test_random_experts_are_drawn_per_sample():
    model = tiny_llava(seed=1)
    dpn.apply_pyramid(model, peer_configs(model)["random"])
    prompts = [make_prompt(3, 4, seed=s) for s in range(8)]
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(**batch_of(prompts), pixel_values=pixels(8))
    first_stage = out.routing.experts[:, 0]
    assert len(set(first_stage.tolist())) > 1  # not one expert for everybody
    assert (out.routing.expert_probability[:, 0] == 1 / 3).all()


@pytest.mark.parametrize("name", PEERS)
def test_batched_matches_each_sample_alone(name):
    model = tiny_llava(seed=4)
    dpn.apply_pyramid(model, peer_configs(model)[name])
    prompts = [make_prompt(2, 3, seed=1), make_prompt(9, 1, seed=2), make_prompt(1, 2, images=2, seed=4)]
    image_counts = [1, 1, 2]
    images = pixels(sum(image_counts))
    slices = torch.split(images, image_counts)
    forced = torch.tensor([[0, 1, 2], [2, 2, 0], [1, 0, 1]]) if name == "random" else None  # random needs a fixed draw
    with torch.no_grad():
        together = model(**batch_of(prompts), pixel_values=images, force_experts=forced)
        for row, prompt in enumerate(prompts):
            alone = model(**batch_of([prompt]), pixel_values=slices[row],
                          force_experts=None if forced is None else forced[row:row + 1])
            valid = together.attention_mask[row].bool()
            torch.testing.assert_close(together.logits[row][valid], alone.logits[0], atol=1e-4, rtol=0)
            assert together.routing.visual_tokens[row].tolist() == alone.routing.visual_tokens[0].tolist()


@pytest.mark.parametrize("spec", ["divprune:0.3", "vispruner:0.3", "visionzip:0.3", "sparsevlm:128", "cdpruner:0.3"])
def test_new_selections_cache_with_kept_positions_and_two_images(spec):
    model = tiny_llava(seed=2)
    dpn.apply_pyramid(model, dpn.presets.from_spec(spec, model.config, positions="keep"))
    batch = {**batch_of([make_prompt(3, 4, seed=1), make_prompt(1, 6, images=2, seed=2)]), "pixel_values": pixels(3)}
    check_cached_generation_matches_recompute(model, batch, None, [IMAGE_TOKEN_ID], new_tokens=3)


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generation_matches_full_recompute(name, attn):
    model = tiny_llava(seed=3, attn=attn)
    dpn.apply_pyramid(model, peer_configs(model)[name])
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(7, 2, seed=2)])
    images = pixels(2)
    new_tokens = 6
    forced = torch.tensor([[2, 1, 0], [1, 2, 0]]) if name == "random" else None  # one fixed draw for both runs
    with torch.no_grad():
        generated = model.generate(**batch, pixel_values=images, max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                                   force_experts=forced)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompt_length = ids.shape[1]
    for step in range(new_tokens):
        labels = torch.full_like(ids, -100)
        labels[:, prompt_length:] = ids[:, prompt_length:]  # the ranking query stays the last prompt token
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=images, labels=labels, use_cache=False,
                        force_experts=forced)
        torch.testing.assert_close(out.logits[:, -1], generated.logits[step], atol=1e-4, rtol=0)
        ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(ids, generated.sequences)


def test_fastv_keeps_the_tokens_eager_attention_ranks_highest():
    """The one attention row FastV computes equals the eager kernel's, and so does its choice."""
    model = tiny_llava(seed=2, attn="eager")
    config = dpn.presets.fastv(model.config, keep_ratio=0.25, layer=2)
    prompts = [make_prompt(3, 5, seed=1), make_prompt(8, 2, seed=2)]
    batch = batch_of(prompts)
    images = pixels(2)
    with torch.no_grad():
        reference = model(**batch, pixel_values=images, output_attentions=True, output_hidden_states=True)
    stage_layer = config.stages[0].layer
    attention = reference.attentions[stage_layer]  # (batch, heads, L, L)
    query = batch["attention_mask"].shape[1] - 1  # left padding: every sample's last prompt token
    reference_row = attention[:, :, query].mean(1)
    # The same row recomputed from the layer's input, as the strategy does.
    decoder = model.model.language_model
    layer_input = reference.hidden_states[stage_layer]
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    row = query_attention(decoder.layers[stage_layer], layer_input, decoder.rotary_emb(layer_input, positions),
                          torch.full((2,), query), batch["attention_mask"].bool())
    torch.testing.assert_close(row, reference_row, atol=1e-5, rtol=1e-4)

    # The strategy keeps exactly the top-ranked visual tokens, in their original order.
    image = batch["input_ids"] == model.config.image_token_id
    hidden = reference.hidden_states[stage_layer + 1]
    plan = AttentionSelection(config, dpn.geometry_of(model)).plan(0, StageInput(
        hidden=hidden, spans=find_visual_spans(image, GRID), query_index=torch.full((2,), query),
        valid=batch["attention_mask"].bool(), layer=decoder.layers[stage_layer], layer_input=layer_input,
        position_embeddings=decoder.rotary_emb(layer_input, positions),
    ))
    keep = kept_count(VISUAL, 0.25)
    length = batch["input_ids"].shape[1]
    expected = []
    for sample in range(2):
        visual_positions = image[sample].nonzero().squeeze(1)
        top = reference_row[sample, visual_positions].topk(keep).indices.sort().values
        expected.append(sample * length + visual_positions[top])
    assert plan.representatives.tolist() == torch.cat(expected).tolist()
    assert plan.grids == [(1, keep)] * 2
    torch.testing.assert_close(plan.rows, hidden.reshape(-1, hidden.shape[-1])[torch.cat(expected)])


def test_selection_strategies_refuse_forced_experts():
    model = tiny_llava()
    dpn.apply_pyramid(model, dpn.presets.fastv(model.config))
    with pytest.raises(ValueError, match="force_experts applies to pooling strategies"):
        model(**batch_of([make_prompt(2, 2)]), pixel_values=pixels(1), force_experts=1)


@pytest.mark.parametrize("spec, strategy", [
    ("static:2x2", "static"), ("projector:4x4", "projector"), ("fastv:0.25", "fastv"), ("pdrop", "pdrop"),
    ("random", "random"), ("paper", "dpn"), ("budget:0.5", "dpn"),
])
def test_specs_name_every_strategy(spec, strategy, tmp_path):
    model = tiny_llava()
    config = dpn.presets.from_spec(spec, model.config)
    assert config.strategy.name == strategy
    dpn.apply_pyramid(model, config)
    dpn.save_pyramid(model, tmp_path)
    reloaded = dpn.load_pyramid(tiny_llava(), tmp_path)
    assert dpn.get_pyramid_config(reloaded) == config


@pytest.mark.parametrize("bad, message", [
    (dict(strategy={"name": "fastv"}, stages=[{"layer": 1, "keep_ratio": 0.5}, {"layer": 2, "keep_ratio": 0.5}]),
     "fastv prunes once"),
    (dict(strategy={"name": "pdrop"}, stages=[{"layer": 1, "experts": [[2, 2]]}]), "needs a keep_ratio"),
    (dict(strategy={"name": "dpn"}, stages=[{"layer": 1, "keep_ratio": 0.5}]), "keep_ratio is for the token-selection"),
    (dict(strategy={"name": "static"}, stages=[{"layer": 1, "experts": [[1, 1], [2, 2]]}]), "exactly one expert"),
    (dict(strategy={"name": "random", "routing_loss": "hinge"}, stages=[{"layer": 1, "experts": [[1, 1], [2, 2]]}]),
     "unknown random strategy keys \\['routing_loss'\\]"),
    (dict(strategy={"name": "dpn", "routing_loss": "budget"}, stages=[{"layer": 1, "experts": [[2, 2]]}]),
     "needs budget_target"),
    (dict(strategy={"name": "fastv"}, stages=[dpn.PoolingStage(1, [(2, 2)])]), "stages of a fastv pyramid are SelectionStage"),
    (dict(strategy={"name": "tome"}, stages=[{"layer": 1}]), "unknown strategy 'tome'"),
])
def test_inconsistent_strategy_configs_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        dpn.PyramidConfig.from_dict({"version": 2, **bad})


@pytest.mark.parametrize("spec", ["fastv:0", "fastv:1.5", "projector:2", "static:ax2", "budget:x"])
def test_bad_specs_say_what_is_wrong(spec):
    with pytest.raises(ValueError, match="pyramid spec"):
        dpn.presets.from_spec(spec, tiny_llava().config)


@pytest.mark.parametrize("name", PEERS)
def test_every_peer_fine_tunes(name):
    """A training step through each strategy: the LM loss is finite and reaches the decoder's weights."""
    model = tiny_llava(seed=7)
    dpn.apply_pyramid(model, peer_configs(model)[name])
    model.train()
    batch = batch_of([make_prompt(3, 4, seed=1), make_prompt(5, 2, seed=2)])
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    out = model(**batch, pixel_values=pixels(2), labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.routing_loss is None
    last_layer = model.model.language_model.layers[-1].mlp.down_proj.weight.grad
    first_layer = model.model.language_model.layers[0].mlp.down_proj.weight.grad
    assert float(last_layer.abs().sum()) > 0 and float(first_layer.abs().sum()) > 0


def _eager_ranking(layer, hidden, mask, position_embeddings, queries):
    """Head-averaged attention ``layer`` (eager) pays each token of ``hidden`` from the ``queries`` rows,
    averaged over them: the reference rankings, from the layer's own attention forward."""
    _, weights = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=position_embeddings,
                                 attention_mask=mask)
    return weights[0].mean(0)[queries].mean(0)


@pytest.mark.parametrize("with_answers", [False, True])
def test_pdrop_keeps_what_the_next_layer_ranks_highest_at_every_stage(with_answers):
    """PyramidDrop's rule (Cooperx521/PyramidDrop): after stage layer i, layer i+1's attention on layer
    i's output; query: the last prompt token, or with answers in the sequence every pre-answer token."""
    model = tiny_llava(seed=3, attn="eager")
    stage_layers = (1, 3)
    dpn.apply_pyramid(model, dpn.PyramidConfig(strategy=dpn.PDropConfig(), stages=[
        dpn.SelectionStage(layer, keep_ratio=0.5) for layer in stage_layers]))
    decoder = model.model.language_model
    captured = {}

    def keep_input(index):
        def hook(module, args, kwargs):
            captured["in", index] = (args[0], kwargs["attention_mask"], kwargs["position_embeddings"])
        return hook

    def keep_output(index):
        def hook(module, args, kwargs, output):
            captured["out", index] = output
        return hook

    handles = []
    for index in range(len(decoder.layers)):
        handles.append(decoder.layers[index].register_forward_pre_hook(keep_input(index), with_kwargs=True))
        handles.append(decoder.layers[index].register_forward_hook(keep_output(index), with_kwargs=True))
    before = 3
    ids = make_prompt(before, 4, seed=5)
    labels = [-100] * len(ids)
    if with_answers:  # two turns: answer, question, answer
        g = torch.Generator().manual_seed(9)
        answer, question, second = (torch.randint(10, 90, (n,), generator=g).tolist() for n in (2, 3, 2))
        labels += answer + [-100] * 3 + second
        ids += answer + question + second
    pre_answers = [i - 1 for i in range(1, len(ids)) if labels[i] != -100 and labels[i - 1] == -100]
    batch = batch_of([ids])
    try:
        with torch.no_grad():
            model(**batch, pixel_values=pixels(1, seed=4), labels=torch.tensor([labels]) if with_answers else None)
    finally:
        for handle in handles:
            handle.remove()

    visual, differs_from_fastv = VISUAL, False
    for layer in stage_layers:
        dropped = VISUAL - visual
        queries = [p - dropped for p in pre_answers] if with_answers else [len(ids) - dropped - 1]
        output = captured["out", layer]
        layer_input, mask, rotary = captured["in", layer]
        with torch.no_grad():
            ranking = _eager_ranking(decoder.layers[layer + 1], output, mask, rotary, queries)
            fastv_rule = _eager_ranking(decoder.layers[layer], layer_input, mask, rotary, queries)
        positions = torch.arange(before, before + visual)
        keep = kept_count(visual, 0.5)
        expected = positions[ranking[positions].topk(keep).indices.sort().values]
        next_input = captured["in", layer + 1][0]
        torch.testing.assert_close(next_input[0, before:before + keep], output[0, expected], rtol=0, atol=0)
        fastv_keep = positions[fastv_rule[positions].topk(keep).indices.sort().values]
        differs_from_fastv |= not torch.equal(fastv_keep, expected)
        visual = keep
    assert differs_from_fastv  # the test tells the two rules apart, so a wrong rule (or a random one) fails


def test_fastv_kept_tokens_keep_their_original_position_ids():
    """FastV (pkunlp-icler/FastV) keeps each kept token's position id; the text after the image too."""
    model = tiny_llava(seed=2)
    dpn.apply_pyramid(model, dpn.presets.fastv(model.config, keep_ratio=0.25, layer=2))
    seen = {}
    handle = model.model.language_model.layers[2].register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(positions=kwargs["position_ids"]), with_kwargs=True)
    before, after = 3, 5
    try:
        with torch.no_grad():
            model(**batch_of([make_prompt(before, after, seed=1)]), pixel_values=pixels(1))
    finally:
        handle.remove()
    positions = seen["positions"][0].tolist()
    keep = kept_count(VISUAL, 0.25)
    visual = positions[before:before + keep]
    assert positions[:before] == list(range(before))
    assert visual == sorted(set(visual)) and before <= visual[0] and visual[-1] < before + VISUAL
    text_after = list(range(before + VISUAL, before + VISUAL + 2 + after))  # make_prompt puts 2 tokens after an image
    assert positions[before + keep:] == text_after


@pytest.mark.parametrize("spec, layer, keep", [
    ("fastv", 1, 0.5), ("fastv:0.75", 1, 0.75), ("fastv:K=3,R=0.75", 2, 0.25), ("fastv:R=0.5", 1, 0.5),
    ("fastv:k=4", 3, 0.5),
])
def test_fastv_specs_take_the_papers_k_and_r(spec, layer, keep):
    config = dpn.presets.from_spec(spec, tiny_llava().config)
    assert (config.stages[0].layer, config.stages[0].keep_ratio, config.positions) == (layer, pytest.approx(keep), "keep")


@pytest.mark.parametrize("spec, message", [
    ("fastv:K=x", "K is a layer number"), ("fastv:R=1", "must be in \\[0, 1\\)"), ("fastv:Q=1", "write K=<layer>"),
    ("fastv:K=9", "layer K must be in 1..5"),
])
def test_bad_fastv_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        dpn.presets.from_spec(spec, tiny_llava().config)


@pytest.mark.parametrize("name", ["divprune", "vispruner", "visionzip", "cdpruner"])
def test_selections_before_the_llm_take_a_budget_in_tokens(name):
    model = tiny_llava(seed=1)
    config = dpn.presets.from_spec(f"{name}:20t", model.config)
    assert kept_count(VISUAL, config.stages[0].keep_ratio) == 20
    dpn.apply_pyramid(model, config)
    with torch.no_grad():
        out = model(**batch_of([make_prompt(3, 4, seed=1)]), pixel_values=pixels(1))
    assert out.routing.visual_tokens[0].tolist() == [VISUAL, 20]
    for bad, message in ((f"{name}:65t", "an image has only 64 visual tokens"),
                         (f"{name}:2.5t", "give a whole number of tokens"), (f"{name}:0t", "give a whole number")):
        with pytest.raises(ValueError, match=message):
            dpn.presets.from_spec(bad, model.config)
    with pytest.raises(ValueError, match="images vary in size, so a token count"):
        dpn.presets.from_spec(f"{name}:20t", tiny_qwen_vl().config)


@pytest.mark.parametrize("name", ["divprune", "cdpruner"])
def test_selections_before_the_llm_keep_their_share_of_images_of_every_size_on_qwen2_5_vl(name):
    model = tiny_qwen_vl(seed=0)
    config = dpn.presets.from_spec(f"{name}:0.3", model.config)
    assert config.positions == "keep"  # M-RoPE keeps coordinates
    dpn.apply_pyramid(model, config)
    grids = [(4, 6), (8, 8)]
    out = qwen_forward(model, grids)
    tokens = [rows * cols // 4 for rows, cols in grids]  # the 2x2 merger
    assert out.routing.visual_tokens.tolist() == [[t, kept_count(t, 0.3)] for t in tokens]
