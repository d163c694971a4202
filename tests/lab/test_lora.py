"""LoRA through peft beside a pyramid: both train, both save, merging keeps the pyramid."""

from __future__ import annotations

import peft
import pytest
import torch
from helpers import batch_of, make_prompt, pixels, tiny_llava

import dpn
from dpn.lab.lora import add_lora, merged


def _batch():
    batch = batch_of([make_prompt(3, 4), make_prompt(5, 2, seed=1)])
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    return {**batch, "pixel_values": pixels(2), "labels": labels}


def _pyramid_then_lora():
    model = tiny_llava()
    dpn.apply_pyramid(model, dpn.presets.paper(model.config, sample_in_training=False))
    return add_lora(model, rank=4)


def _lora_then_pyramid():
    model = add_lora(tiny_llava(), rank=4)
    return dpn.apply_pyramid(model, dpn.presets.paper(model.config, sample_in_training=False))


@pytest.mark.parametrize("build", [_pyramid_then_lora, _lora_then_pyramid])
def test_lora_weights_and_routers_both_train(build):
    model = build().train()
    assert isinstance(model, peft.PeftModel) and dpn.has_pyramid(model)
    out = model(**_batch())
    assert out.routing_loss is not None
    (out.loss + out.routing_loss).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    lora = [g for name, g in grads.items() if "lora_B" in name]
    routers = [g for name, g in grads.items() if ".pyramid." in name]
    assert lora and routers and all(g is not None for g in lora + routers)
    assert any(g.abs().sum() > 0 for g in lora) and any(g.abs().sum() > 0 for g in routers)
    assert all("lora_" in name or ".pyramid." in name for name in grads)  # the base stays frozen
    assert not any("vision_tower" in name for name in grads)


def test_adapter_and_pyramid_save_side_by_side_and_reload(tmp_path):
    model = _pyramid_then_lora()
    with torch.no_grad():  # move the adapters and routers away from their initialisation
        for name, parameter in model.named_parameters():
            if "lora_B" in name or ".pyramid." in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    model.eval()
    model.save_pretrained(tmp_path)  # peft: the adapter only
    dpn.save_pyramid(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "pyramid_model.safetensors").is_file()
    base = tiny_llava()  # the same base weights (same seed)
    dpn.load_pyramid(base, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    with torch.no_grad():
        expected, got = model(**batch), reloaded(**batch)
    torch.testing.assert_close(got.logits, expected.logits)
    assert torch.equal(got.routing.experts, expected.routing.experts)


def test_merging_lora_keeps_the_pyramid():
    model = _pyramid_then_lora().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    with torch.no_grad():
        before = model(**batch)
        plain = merged(model)
        after = plain(**batch)
    assert not isinstance(plain, peft.PeftModel) and dpn.has_pyramid(plain)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(after.routing.experts, before.routing.experts)
    dpn.remove_pyramid(plain)
    assert not dpn.has_pyramid(plain)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "the LoRA rank must be an integer of at least 1, got 0"),
    (dict(rank=4, dropout=1.0), "the LoRA dropout must be in \\[0, 1\\), got 1.0"),
    (dict(rank=4, alpha=-2.0), "the LoRA alpha must be a positive number, got -2.0"),
    (dict(rank=4, targets=()), "at least one target"),
    # peft itself only refuses a list that matches nothing at all; a misspelt name among good ones is refused too
    (dict(rank=4, targets=("q_proj", "qproj")), "LoRA target\\(s\\) qproj match no module of the language model; "
                                                "its linear layers are named down_proj, gate_proj, k_proj"),
    (dict(rank=4, targets=("norm",)), "LoRA cannot adapt the modules norm name here \\(LlamaRMSNorm\\)"),
])
def test_bad_lora_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_lora(tiny_llava(), **kwargs)
