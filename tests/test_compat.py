"""dpn.compat: the cache argument under the installed transformers' name, and under either name from callers; the
rows `logits_to_keep` keeps."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import dpn
from dpn.compat import CACHE_ARGUMENT, LEGACY_CACHE_ARGUMENT, RENAMED_CACHE_ARGUMENT, output_cache
from helpers import batch_of, make_prompt, pixels, tiny_llava


def test_the_cache_argument_is_the_name_the_installed_release_uses():
    assert CACHE_ARGUMENT in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    assert CACHE_ARGUMENT in inspect.signature(LlamaDecoderLayer.forward).parameters
    assert CACHE_ARGUMENT in {f.name for f in dataclasses.fields(dpn.PyramidCausalLMOutput)}


def _prefill_and_step(model, **names):
    """A prefill, then one decoding step handing the prefill's cache over under ``names``' keyword."""
    batch = {**batch_of([make_prompt(3, 2), make_prompt(1, 4, seed=1)]), "pixel_values": pixels(2)}
    with torch.no_grad():
        prefill = model(**batch, use_cache=True, force_experts=[1, 2, 1])
        cache = output_cache(prefill)
        assert isinstance(cache, dpn.PyramidCache)
        mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
        arguments = {name: cache for name in names}
        return model(input_ids=torch.tensor([[30], [31]]), attention_mask=mask, use_cache=True, **arguments)


def test_a_pyramid_takes_the_cache_under_either_name_and_refuses_both():
    model = tiny_llava(seed=0)
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    renamed = _prefill_and_step(model, **{RENAMED_CACHE_ARGUMENT: True})
    legacy = _prefill_and_step(model, **{LEGACY_CACHE_ARGUMENT: True})
    torch.testing.assert_close(renamed.logits, legacy.logits, atol=0, rtol=0)
    assert output_cache(renamed).get_seq_length() == output_cache(legacy).get_seq_length() > 0
    with pytest.raises(ValueError, match="pass the cache once"):
        _prefill_and_step(model, **{RENAMED_CACHE_ARGUMENT: True, LEGACY_CACHE_ARGUMENT: True})


def test_generate_hands_the_pyramid_cache_back_on_this_release():
    """Each decoding step of generate gets one new token: the prefill's cache came back under the
    release's name (without it, every step would recompute the whole sequence)."""
    model = tiny_llava(seed=0)
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    batch = {**batch_of([make_prompt(3, 2)]), "pixel_values": pixels(1)}
    lengths = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    assert lengths == [batch["input_ids"].shape[1], 1, 1, 1]


@pytest.mark.parametrize("logits_to_keep", [0, 1, 3, torch.tensor([0, 2, 4])])
def test_logits_to_keep_rows_are_the_same_with_and_without_the_shared_helper(monkeypatch, logits_to_keep):
    """dpn.compat.slice_logits_to_keep uses transformers' helper where the release has it (5.20 on) and
    slices inline before: both give the rows a stock forward computes logits for."""
    from transformers import modeling_utils

    from dpn.compat import slice_logits_to_keep

    hidden = torch.randn(2, 5, 4)
    expected = hidden[:, slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep]
    torch.testing.assert_close(slice_logits_to_keep(hidden, logits_to_keep), expected)
    monkeypatch.delattr(modeling_utils, "slice_logits_to_keep", raising=False)
    torch.testing.assert_close(slice_logits_to_keep(hidden, logits_to_keep), expected)
