"""LoRA through peft on a model with (or without) a pyramid.

``add_lora`` wraps a model in a ``peft.PeftModel`` whose LoRA adapters sit on the language model's
attention and MLP projections; the pyramid's routers (new weights) stay trainable beside them.
Either order works: a pyramid applied before ``add_lora`` runs inside the peft wrapper, and
``dpn.apply_pyramid`` on a wrapped model puts the pyramid on the wrapped model. peft saves the
adapter, ``dpn.save_pyramid`` the routers; ``merged`` folds the adapters into the weights and keeps
the pyramid (a plain model ``dpn eval`` loads).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from torch import nn

from dpn.api import get_pyramid, has_pyramid

# The language model's projections, by their names in Llama / Qwen2 / Mistral decoders.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LANGUAGE_MODEL_SCOPE = "language_model"
DEFAULT_LORA_ALPHA_PER_RANK = 2  # alpha = 2 r, a common choice


def _target_pattern(targets: tuple[str, ...] | list[str]) -> str:
    # a regular expression: only the language model's projections, not the vision tower's
    return rf".*{LANGUAGE_MODEL_SCOPE}.*\.({'|'.join(targets)})"


def unmatched_targets(model: Any, targets: tuple[str, ...] | list[str]) -> list[str]:
    """The names in ``targets`` that match none of the language model's modules (peft itself only
    complains when all of them match nothing)."""
    names = [name for name, _ in model.named_modules()]
    unmatched = []
    for target in targets:
        try:
            pattern = re.compile(_target_pattern([target]))
        except re.error as err:
            raise ValueError(f"LoRA target {target!r} is not a valid module name or regular expression: {err}") from err
        if not any(pattern.fullmatch(name) for name in names):
            unmatched.append(target)
    return unmatched


def language_model_projections(model: Any) -> list[str]:
    """The names (last part) of the language model's linear layers: what LoRA targets can be."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and LANGUAGE_MODEL_SCOPE in name})


def check_lora_arguments(rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
    """``add_lora``'s numbers, checked before peft sees them."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"the LoRA rank must be an integer of at least 1, got {rank!r}")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"the LoRA alpha must be a positive number, got {alpha}")
    if not (math.isfinite(dropout) and 0 <= dropout < 1):
        raise ValueError(f"the LoRA dropout must be in [0, 1), got {dropout}")


def add_lora(model: Any, rank: int, targets: tuple[str, ...] = DEFAULT_LORA_TARGETS, alpha: float | None = None,
             dropout: float = 0.0) -> Any:
    """``model`` wrapped in a ``PeftModel`` with rank-``rank`` LoRA on the language model's ``targets``
    (vision tower and projector untouched); the routers of its pyramid, if any, stay trainable.

    ``targets`` are module names (or regular expressions) matched against the last part of the
    language model's module names; one that matches nothing is a ``ValueError``.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("LoRA needs peft: pip install 'dpn[lora]'") from err
    check_lora_arguments(rank, alpha, dropout)
    targets = tuple(targets)
    if not targets:
        raise ValueError("LoRA needs at least one target module name")
    unmatched = unmatched_targets(model, targets)
    if unmatched:
        raise ValueError(
            f"LoRA target(s) {', '.join(unmatched)} match no module of the language model; its linear layers "
            f"are named {', '.join(language_model_projections(model)) or '(none found)'}")
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else DEFAULT_LORA_ALPHA_PER_RANK * rank, lora_dropout=dropout,
        target_modules=_target_pattern(targets),
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as err:
        if "is not supported" not in str(err):
            raise
        pattern = re.compile(_target_pattern(targets))  # peft's message prints the whole module: name its type
        kinds = sorted({type(module).__name__ for name, module in model.named_modules() if pattern.fullmatch(name)})
        raise ValueError(
            f"LoRA cannot adapt the modules {', '.join(targets)} name here ({', '.join(kinds)}); the language model's "
            f"linear layers are named {', '.join(language_model_projections(model)) or '(none found)'}") from err
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


ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes beside the adapter's weights


def is_adapter_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a peft adapter (a LoRA run's checkpoint) rather than full weights."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def check_adapter_matches(model: Any, directory: str | Path) -> None:
    """Refuse an adapter saved in ``directory`` whose rank, alpha or targets differ from ``model``'s
    (peft would fail on the shapes, or load it silently with another scaling or fewer layers)."""
    saved = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
    config = model.peft_config[model.active_adapter]
    keys = ("r", "lora_alpha", "target_modules")
    ours = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": config.target_modules}
    theirs = {key: saved.get(key) for key in keys}
    for values in (ours, theirs):  # peft writes a list of names as a (sorted) list, a pattern as a string
        if isinstance(values["target_modules"], (set, list, tuple)):
            values["target_modules"] = sorted(values["target_modules"])
    different = [f"{key} {theirs[key]} there, {ours[key]} here" for key in keys if theirs[key] != ours[key]]
    if different:
        raise ValueError(f"the LoRA adapter in {directory} does not match this run's ({'; '.join(different)})")
