"""Per-family adapters, keyed by ``config.model_type`` (see ``dpn.models.base``).

The runtime itself never names a family, so LLaVA-NeXT or Qwen2-VL are one new adapter each.
"""

from __future__ import annotations

from typing import Any

from dpn.geometry import ModelGeometry
from dpn.models.base import CallInputs, ModelAdapter, PreparedBatch
from dpn.models.llava import LlavaAdapter
from dpn.models.llava_next import LlavaNextAdapter
from dpn.models.positions import LinearPositions, MultimodalRotaryPositions
from dpn.models.qwen2_vl import Qwen2VLAdapter

_ADAPTERS: dict[str, ModelAdapter] = {}
# Families dpn knows and cannot run yet, with the reason (a clear error instead of "no adapter").
UNSUPPORTED = {
    "qwen3_vl": "Qwen3-VL adds visual features to the hidden states of its first LLM layers (DeepStack, at "
                "visual_pos_masks); dpn does not yet move those positions through a stage, so features would be "
                "added to the wrong tokens",
}
UNSUPPORTED["qwen3_vl_moe"] = UNSUPPORTED["qwen3_vl"]


def register_adapter(adapter: ModelAdapter) -> None:
    """Make ``adapter`` serve every ``model_type`` in ``adapter.model_types``."""
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter


def get_adapter(model_or_config: Any) -> ModelAdapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in UNSUPPORTED and model_type not in _ADAPTERS:
        raise ValueError(f"dpn does not support {model_type!r} yet: {UNSUPPORTED[model_type]}")
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"dpn has no adapter for model_type {model_type!r}; supported: {sorted(_ADAPTERS)}. "
            "Register one with dpn.models.register_adapter."
        )
    return _ADAPTERS[model_type]


def geometry_of(model_or_config: Any) -> ModelGeometry:
    """The ``ModelGeometry`` of a model or its config (a geometry is returned as it is)."""
    if isinstance(model_or_config, ModelGeometry):
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)
    return get_adapter(config).geometry(config)


register_adapter(LlavaAdapter())
register_adapter(Qwen2VLAdapter())
register_adapter(LlavaNextAdapter())

__all__ = [
    "CallInputs", "LinearPositions", "LlavaAdapter", "LlavaNextAdapter", "ModelAdapter", "MultimodalRotaryPositions", "PreparedBatch",
    "Qwen2VLAdapter", "geometry_of", "get_adapter", "register_adapter",
]
