"""Greedy decoding by hand, as ``generate(do_sample=False)`` computes it, keeping the prefill output.

``dpn eval`` and ``dpn bench`` decode with their own loop because the prefill output carries what
the pyramid did (``routing``), which ``generate`` does not return. The loop gives every call the
positions ``generate`` would: the prompt's from the model's own ``generate`` preparation (1-D
positions that skip left padding; for Qwen2-VL its text and 3-axis rows), then one more per step.
"""

from __future__ import annotations

import torch


def prompt_positions(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``position_ids`` ``generate`` gives the prompt of ``batch`` (without a cache)."""
    return model._prepare_position_ids_for_generation(batch["input_ids"], dict(batch))


@torch.no_grad()
def greedy_continue(model, prefill, attention_mask: torch.Tensor, positions: torch.Tensor, steps: int,
                    eos_token_id: int | None = None, pad_token_id: int = 0) -> torch.Tensor:
    """Greedy decoding with the KV cache from a prefill output: (batch, <= steps) new token ids.

    ``positions`` are the prompt's (``prompt_positions``). Finished sequences (after
    ``eos_token_id``) continue with ``pad_token_id``; decoding stops when all are finished.
    """
    cache = prefill.past_key_values
    next_token = prefill.logits[:, -1].argmax(-1)
    finished = torch.zeros_like(next_token, dtype=torch.bool)
    position = positions[..., -1:]
    tokens = []
    for step in range(steps):
        next_token = torch.where(finished, pad_token_id, next_token)
        tokens.append(next_token)
        if eos_token_id is not None:
            finished |= next_token == eos_token_id
        if step == steps - 1 or (eos_token_id is not None and bool(finished.all())):  # no needless device wait
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position = position + 1
        out = model(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=position,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        next_token = out.logits[:, -1].argmax(-1)
    return torch.stack(tokens, dim=1)


@torch.no_grad()
def greedy_answer(model, batch: dict[str, torch.Tensor], max_new_tokens: int, eos_token_id: int, pad_token_id: int):
    """Greedy answers and the prefill output, whose ``routing`` says what the pyramid did.

    The same computation as ``model.generate(do_sample=False)`` (the tests check it).
    """
    positions = prompt_positions(model, batch)
    prefill = model(**batch, position_ids=positions, use_cache=True, logits_to_keep=1)
    tokens = greedy_continue(model, prefill, batch["attention_mask"], positions, max_new_tokens, eos_token_id,
                             pad_token_id)
    return tokens, prefill
