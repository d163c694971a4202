"""LoRA through peft on a model with (or without) a pyramid.

``add_lora`` wraps a model in a ``peft.PeftModel`` whose LoRA adapters sit on the language model's
attention and MLP projections; the pyramid's routers (new weights) stay trainable beside them.
Either order works: a pyramid applied before ``add_lora`` runs inside the peft wrapper, and
``dpn.apply_pyramid`` on a wrapped model puts the pyramid on the wrapped model. peft saves the
adapter, ``dpn.save_pyramid`` the routers; ``merged`` folds the adapters into the weights and keeps
the pyramid (a plain model ``dpn eval`` loads).
"""

from __future__ import annotations

from typing import Any

from dpn.api import get_pyramid, has_pyramid

# The language model's projections, by their names in Llama / Qwen2 / Mistral decoders.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LANGUAGE_MODEL_SCOPE = "language_model"
DEFAULT_LORA_ALPHA_PER_RANK = 2  # alpha = 2 r, a common choice


def add_lora(model: Any, rank: int, targets: tuple[str, ...] = DEFAULT_LORA_TARGETS, alpha: float | None = None,
             dropout: float = 0.0) -> Any:
    """``model`` wrapped in a ``PeftModel`` with rank-``rank`` LoRA on the language model's ``targets``
    (vision tower and projector untouched); the routers of its pyramid, if any, stay trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("LoRA needs peft: pip install 'dpn[lora]'") from err
    if rank < 1:
        raise ValueError(f"the LoRA rank must be at least 1, got {rank}")
    names = "|".join(targets)
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else DEFAULT_LORA_ALPHA_PER_RANK * rank, lora_dropout=dropout,
        # a regular expression: only the language model's projections, not the vision tower's
        target_modules=rf".*{LANGUAGE_MODEL_SCOPE}.*\.({names})",
    )
    wrapped = get_peft_model(model, config)
    if has_pyramid(wrapped):
        for parameter in get_pyramid(wrapped).parameters():
            parameter.requires_grad_(True)  # peft freezes every weight that is not an adapter
    return wrapped


def is_lora(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def merged(model: Any) -> Any:
    """The model with its LoRA adapters folded into the weights (the pyramid stays on it)."""
    return model.merge_and_unload() if is_lora(model) else model
