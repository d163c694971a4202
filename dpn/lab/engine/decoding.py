"""Decoding by hand, as ``generate`` computes it, keeping the prefill output.

``dpn eval`` and ``dpn bench`` decode with their own loop because the prefill output carries what
the pyramid did (``routing``), which ``generate`` does not return. The loop gives every call the
positions ``generate`` would: the prompt's from the model's own ``generate`` preparation (1-D
positions that skip left padding; for Qwen2-VL its text and 3-axis rows), then one more per step.
"""

from __future__ import annotations

from typing import Callable

import torch

from dpn.compat import cache_keyword, output_cache

MIN_TEMPERATURE = 1e-5  # rows at temperature 0 are greedy; this only keeps their (unused) division finite


def prompt_positions(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``position_ids`` ``generate`` gives the prompt of ``batch`` (without a cache)."""
    return model._prepare_position_ids_for_generation(batch["input_ids"], dict(batch))


def next_tokens(logits: torch.Tensor, temperatures: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` (batch, vocab): the most likely one, or one sampled at
    the row's temperature where ``temperatures`` (batch,) is above zero."""
    greedy = logits.argmax(-1)
    if temperatures is None:
        return greedy
    scaled = logits.float() / temperatures.clamp_min(MIN_TEMPERATURE)[:, None]
    sampled = torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(-1)
    return torch.where(temperatures > 0, sampled, greedy)


@torch.no_grad()
def decode(model, prefill, attention_mask: torch.Tensor, positions: torch.Tensor, max_new_tokens: int | list[int],
           eos_token_id: int | None = None, pad_token_id: int = 0, temperatures: list[float] | None = None,
           generator: torch.Generator | None = None,
           on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Decoding with the KV cache from a prefill output: (batch, <= max steps) new token ids.

    ``positions`` are the prompt's (``prompt_positions``). ``max_new_tokens`` is one limit or one per
    row; ``temperatures`` (one per row, 0 = greedy) sample where above zero. A row is finished after
    ``eos_token_id`` or its limit and continues with ``pad_token_id``; decoding stops when all are.
    ``on_step(tokens, live)`` sees each step's tokens and which rows produced them (not finished).
    """
    rows = attention_mask.shape[0]
    limits = torch.tensor(max_new_tokens, device=attention_mask.device) if isinstance(max_new_tokens, list) else None
    steps = max(max_new_tokens) if isinstance(max_new_tokens, list) else max_new_tokens
    if temperatures is not None and len(temperatures) != rows:
        raise ValueError(f"{len(temperatures)} temperatures for {rows} rows")
    sampling = temperatures is not None and any(t > 0 for t in temperatures)
    temperature = torch.tensor(temperatures, device=attention_mask.device) if sampling else None
    may_stop = eos_token_id is not None or limits is not None
    cache = output_cache(prefill)
    next_token = next_tokens(prefill.logits[:, -1], temperature, generator)
    finished = torch.zeros_like(next_token, dtype=torch.bool)
    position = positions[..., -1:]
    tokens = []
    for step in range(steps):
        next_token = torch.where(finished, pad_token_id, next_token)
        tokens.append(next_token)
        if on_step is not None:
            on_step(next_token, ~finished)
        if eos_token_id is not None:
            finished |= next_token == eos_token_id
        if limits is not None:
            finished |= limits <= step + 1
        if step == steps - 1 or (may_stop and bool(finished.all())):  # no needless device wait
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position = position + 1
        out = model(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=position,
                    **cache_keyword(cache), use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        next_token = next_tokens(out.logits[:, -1], temperature, generator)
    return torch.stack(tokens, dim=1)


def greedy_continue(model, prefill, attention_mask: torch.Tensor, positions: torch.Tensor, steps: int,
                    eos_token_id: int | None = None, pad_token_id: int = 0) -> torch.Tensor:
    """Greedy ``decode`` of ``steps`` tokens at most."""
    return decode(model, prefill, attention_mask, positions, steps, eos_token_id, pad_token_id)
