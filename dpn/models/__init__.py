"""Per-architecture adapters, keyed by ``config.model_type``.

An adapter tells the runtime where a multimodal model keeps the pieces it needs: the text decoder
(embeddings, decoder layers, final norm, rotary embedding), the LM head, the image-token id, the
shape of one image's visual-token grid, and how to embed a batch with its images merged in. The
runtime itself never names an architecture, so LLaVA-NeXT or Qwen2-VL are one new adapter each.
"""

from __future__ import annotations

from typing import Any

from dpn.models.base import ModelAdapter
from dpn.models.llava import LlavaAdapter

_ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> None:
    """Make ``adapter`` serve every ``model_type`` in ``adapter.model_types``."""
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter


def get_adapter(model_or_config: Any) -> ModelAdapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"dpn has no adapter for model_type {model_type!r}; supported: {sorted(_ADAPTERS)}. "
            "Register one with dpn.models.register_adapter."
        )
    return _ADAPTERS[model_type]


register_adapter(LlavaAdapter())

__all__ = ["ModelAdapter", "LlavaAdapter", "get_adapter", "register_adapter"]
