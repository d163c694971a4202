"""What moved between the transformers releases dpn supports, in one place.

The supported range is pyproject's ``transformers`` requirement; CI runs the suite on its oldest
release (``constraints.txt``) and on the newest one published. Every name that differs between
releases is resolved here, from the installed release's own classes (not from version numbers),
and the rest of dpn asks this module instead of spelling the name.

- **The cache argument.** transformers 5.24 renamed ``past_key_values`` to ``cache`` in every
  forward, in ``generate``'s model inputs and in the output classes (the old name still works with a
  deprecation warning until 5.40 in forwards; ``generate`` reads only the new one from outputs).
- **Which positions get logits.** transformers 5.20 moved the ``logits_to_keep`` slicing of the
  forwards into ``modeling_utils.slice_logits_to_keep`` (2D position and mask tensors added); before
  it, each forward sliced inline (an int keeps the last positions, a 1D tensor those positions).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from transformers import modeling_utils
from transformers.modeling_outputs import CausalLMOutputWithPast

LEGACY_CACHE_ARGUMENT = "past_key_values"
RENAMED_CACHE_ARGUMENT = "cache"
# The name the installed release uses for the KV cache in forward calls and outputs.
CACHE_ARGUMENT = (RENAMED_CACHE_ARGUMENT if RENAMED_CACHE_ARGUMENT in {f.name for f in fields(CausalLMOutputWithPast)}
                  else LEGACY_CACHE_ARGUMENT)
# Every name a caller may hand the cache under: the installed one first.
CACHE_ARGUMENTS = tuple(dict.fromkeys((CACHE_ARGUMENT, RENAMED_CACHE_ARGUMENT, LEGACY_CACHE_ARGUMENT)))


def cache_keyword(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for calling a stock forward, decoder layer or mask builder of this release."""
    return {CACHE_ARGUMENT: cache}


def output_cache(output: Any) -> Any:
    """The KV cache of a model output (stock or pyramid) under this release's name."""
    return getattr(output, CACHE_ARGUMENT)


def pop_cache(arguments: dict[str, Any]) -> Any:
    """Remove the cache from ``arguments`` under whichever name the caller used and return it; one
    cache under two names is an error (it would be ambiguous which one is meant)."""
    given = {name: arguments.pop(name) for name in CACHE_ARGUMENTS if name in arguments}
    passed = {name: value for name, value in given.items() if value is not None}
    if len(passed) > 1:
        raise ValueError(f"pass the cache once, as {CACHE_ARGUMENT}= (got {' and '.join(sorted(passed))})")
    return next(iter(passed.values()), None)


def slice_logits_to_keep(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The rows of ``hidden`` (batch, length, d) the forward's ``logits_to_keep`` asks logits for, as
    the installed release's forwards slice them."""
    if hasattr(modeling_utils, "slice_logits_to_keep"):
        return modeling_utils.slice_logits_to_keep(hidden, logits_to_keep)
    rows = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden[:, rows, :]
