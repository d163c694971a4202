"""The lab's way from a ``--pyramid`` spec to a pyramid on a loaded model and its prompts.

A spec whose preset reads a dedicated router token (``released``) gets the token added to the
tokenizer and the model's embeddings first; the data path then writes that token after every
human turn for any pyramid that reads one (``router_token`` in ``LlavaDataset``).
"""

from __future__ import annotations

from typing import Any

from dpn import presets
from dpn.api import get_pyramid_config, has_pyramid
from dpn.config import PyramidConfig
from dpn.router_token import add_router_token, router_token_text


def pyramid_from_spec(spec: str, model: Any, tokenizer: Any) -> PyramidConfig | None:
    """``presets.from_spec`` for a model about to be trained or evaluated with ``tokenizer``."""
    overrides = {}
    if presets.reads_router_token(spec, model.config):
        overrides["router_token_id"] = add_router_token(model, tokenizer)
    return presets.from_spec(spec, model.config, **overrides)


def prompt_router_token(model: Any, tokenizer: Any) -> str | None:
    """The router token the model's pyramid reads, to write after each human turn (None: none)."""
    return router_token_text(get_pyramid_config(model) if has_pyramid(model) else None, tokenizer)
