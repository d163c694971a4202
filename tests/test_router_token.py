"""DPN as released: routers reading the mean over the <ROUTER> tokens, and the helpers that add them."""

from __future__ import annotations

import pytest
import torch
from helpers import batch_of, make_prompt, pixels, tiny_llava

import dpn
from dpn.router_token import ROUTER_TOKEN, add_router_token, insert_router_tokens, router_token_text
from dpn.strategies.dpn import PAPER_TEMPERATURE, RELEASED_MIN_KEPT_TOKENS

ROUTER_ID = 9


def _released(model, **overrides):
    return dpn.presets.released(model.config, router_token_id=ROUTER_ID, **overrides)


def _two_turns(seed: int = 0) -> list[int]:
    """An image prompt with a router token after each of two human turns (and text after each)."""
    return make_prompt(2, 3, seed=seed) + [ROUTER_ID, 40, 41, 42, 43, ROUTER_ID, 44]


def test_released_preset_is_the_released_recipe():
    model = tiny_llava()
    config = _released(model)
    assert config.router_input == "router_tokens_mean" and config.router_token_id == ROUTER_ID
    assert config.strategy.routing_loss == "hinge_global"
    assert config.strategy.min_kept_tokens == RELEASED_MIN_KEPT_TOKENS == 18
    assert [s.layer for s in config.stages] == [s.layer for s in dpn.presets.paper(model.config).stages]
    with pytest.raises(ValueError, match="reads a <ROUTER> token: pass router_token_id"):
        dpn.presets.from_spec("released", model.config)
    assert dpn.presets.from_spec("released", model.config, router_token_id=ROUTER_ID) == config
    assert dpn.presets.reads_router_token("released", model.config)
    assert not dpn.presets.reads_router_token("paper", model.config)
    with pytest.raises(ValueError, match="needs router_token_id"):
        dpn.PyramidConfig(stages=config.stages, router_input="router_tokens_mean")


def test_routers_read_the_mean_of_the_router_tokens():
    model = tiny_llava()
    dpn.apply_pyramid(model, _released(model))
    prompt = _two_turns()
    with torch.no_grad():
        out = model(**batch_of([prompt]), pixel_values=pixels(1), output_hidden_states=True)
    stage_layer = model.pyramid.config.stages[0].layer
    hidden = out.hidden_states[stage_layer + 1][0]
    positions = [i for i, token in enumerate(prompt) if token == ROUTER_ID]
    assert len(positions) == 2
    with torch.no_grad():
        mean_probs = torch.softmax(model.pyramid.routers[0](hidden[positions].mean(0)).float() / PAPER_TEMPERATURE, -1)
        last_probs = torch.softmax(model.pyramid.routers[0](hidden[positions[-1]]).float() / PAPER_TEMPERATURE, -1)
    torch.testing.assert_close(out.routing.router_probs[0][0], mean_probs)
    assert not torch.allclose(mean_probs, last_probs)  # the test would notice a router on the last token


def test_with_one_router_token_the_mean_is_that_token_at_every_stage():
    """The router tokens travel with their tokens through every shrink (stage 0 forced to pool)."""
    model = tiny_llava()
    prompt = make_prompt(2, 3) + [ROUTER_ID, 40, 41]
    probs = {}
    for mode in ("router_tokens_mean", "router_token"):
        torch.manual_seed(0)  # the same router weights in both modes
        dpn.apply_pyramid(model, _released(model, router_input=mode))
        with torch.no_grad():
            out = model(**batch_of([prompt, make_prompt(5, 1, seed=1) + [ROUTER_ID]]), pixel_values=pixels(2),
                        force_experts=[[2, -1, -1], [1, -1, -1]])
        probs[mode] = out.routing.router_probs
        dpn.remove_pyramid(model)
    assert len(probs["router_token"]) == 3
    for mean, last in zip(probs["router_tokens_mean"], probs["router_token"]):
        torch.testing.assert_close(mean, last)


def test_mean_routing_is_the_same_batched_and_alone_and_cached_generation_matches():
    model = tiny_llava()
    dpn.apply_pyramid(model, _released(model))
    prompts = [_two_turns(0), make_prompt(6, 1, seed=2) + [ROUTER_ID, 50, ROUTER_ID]]
    with torch.no_grad():
        together = model(**batch_of(prompts), pixel_values=pixels(2)).routing
        for row, prompt in enumerate(prompts):
            alone = model(**batch_of([prompt]), pixel_values=pixels(2)[row:row + 1]).routing
            assert together.experts[row].tolist() == alone.experts[0].tolist()
            for stage, probs in enumerate(alone.router_probs):
                torch.testing.assert_close(together.router_probs[stage][row], probs[0], rtol=1e-4, atol=1e-5)
        batch = batch_of(prompts)
        generated = model.generate(**batch, pixel_values=pixels(2), max_new_tokens=4, do_sample=False, pad_token_id=0)
        ids = batch["input_ids"]
        mask = batch["attention_mask"]
        for _ in range(4):  # the same tokens without the cache: each step recomputes the whole prompt
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(2), use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(generated, ids)


def test_add_router_token_grows_the_vocabulary_once():
    from dpn.lab.families import zoo

    model, processor = zoo.build_tiny(seed=0)
    tokenizer = processor.tokenizer
    before = model.get_input_embeddings().num_embeddings
    token_id = add_router_token(model, tokenizer)
    assert tokenizer.convert_ids_to_tokens(token_id) == ROUTER_TOKEN
    assert tokenizer(f"a b{ROUTER_TOKEN}", add_special_tokens=False)["input_ids"][-1] == token_id  # one piece
    assert model.get_input_embeddings().num_embeddings == max(before, token_id + 1)
    assert model.get_output_embeddings().weight.shape[0] == model.get_input_embeddings().num_embeddings
    assert add_router_token(model, tokenizer) == token_id  # idempotent
    assert model.get_input_embeddings().num_embeddings == max(before, token_id + 1)
    config = dpn.presets.released(model.config, router_token_id=token_id)
    assert router_token_text(config, tokenizer) == ROUTER_TOKEN
    assert router_token_text(dpn.presets.paper(model.config), tokenizer) is None
    with pytest.raises(ValueError, match="does not have"):
        router_token_text(dpn.presets.released(model.config, router_token_id=len(tokenizer) + 5), tokenizer)


def test_insert_router_tokens_ends_every_user_turn():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    inserted = insert_router_tokens(messages)
    assert inserted[0] == messages[0] and inserted[2] == messages[2]
    assert inserted[1]["content"] == "hi" + ROUTER_TOKEN
    assert inserted[3]["content"][-1] == {"type": "text", "text": ROUTER_TOKEN}
    assert messages[1]["content"] == "hi" and len(messages[3]["content"]) == 2  # the input is unchanged
    with pytest.raises(ValueError, match="string or a list"):
        insert_router_tokens([{"role": "user", "content": None}])
