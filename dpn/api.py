"""Public API: put a pyramid on one model instance, take it off, save and load it.

In the spirit of peft: ``apply_pyramid`` patches *that instance* (its ``forward`` and a ``pyramid``
submodule holding the routers); no class and no transformers source is changed. The pyramid's own
weights are saved apart from the model's, as ``pyramid_model.safetensors`` beside
``pyramid_config.json``, so a checkpoint written by ``model.save_pretrained`` stays a plain
transformers checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MethodType

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dpn.config import CONFIG_NAME, PROBABILITY_SCALES, PyramidConfig
from dpn.models import get_adapter
from dpn.runtime import pyramid_forward
from dpn.strategies import Strategy, build_strategy

WEIGHTS_NAME = "pyramid_model.safetensors"
PYRAMID_ATTRIBUTE = "pyramid"


def has_pyramid(model: nn.Module) -> bool:
    return isinstance(getattr(model, PYRAMID_ATTRIBUTE, None), Strategy)


def apply_pyramid(model: nn.Module, config: PyramidConfig) -> nn.Module:
    """Turn ``model`` (in place) into a DPN model, or one running any strategy of ``dpn.config``, and return it.

    Raises ``ValueError`` if the architecture is unsupported, a stage is out of range, or a stride
    does not divide the visual grid on some routing path.
    """
    if has_pyramid(model):
        raise ValueError("this model already has a pyramid; call dpn.remove_pyramid(model) first")
    if not isinstance(config, PyramidConfig):
        raise ValueError(f"config must be a dpn.PyramidConfig, got {type(config).__name__}")
    adapter = get_adapter(model)
    config.validate_for(adapter.num_layers(model.config), adapter.visual_grid(model.config))
    reference = adapter.decoder(model).get_input_embeddings().weight
    pyramid = build_strategy(config, adapter.hidden_size(model.config)).to(
        device=reference.device, dtype=reference.dtype
    )
    pyramid.train(model.training)
    _attach(model, pyramid)
    return model


def _attach(model: nn.Module, pyramid: Strategy) -> None:
    model.add_module(PYRAMID_ATTRIBUTE, pyramid)
    model.forward = MethodType(pyramid_forward, model)
    # Keep `model.save_pretrained` a vanilla checkpoint; the pyramid saves beside it (save_pyramid).
    model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | set(_pyramid_keys(pyramid))


def remove_pyramid(model: nn.Module) -> nn.Module:
    """Undo ``apply_pyramid``: the model behaves exactly as before it was applied."""
    if not has_pyramid(model):
        raise ValueError("this model has no pyramid to remove")
    pyramid = getattr(model, PYRAMID_ATTRIBUTE)
    model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save) - set(_pyramid_keys(pyramid))
    delattr(model, PYRAMID_ATTRIBUTE)
    if "forward" in vars(model):
        del model.forward
    return model


@contextmanager
def pyramid_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the vanilla model inside the block; the same pyramid (same weights) returns after."""
    if not has_pyramid(model):
        yield model
        return
    pyramid = getattr(model, PYRAMID_ATTRIBUTE)
    remove_pyramid(model)
    try:
        yield model
    finally:
        _attach(model, pyramid)


def get_pyramid_config(model: nn.Module) -> PyramidConfig:
    if not has_pyramid(model):
        raise ValueError("this model has no pyramid")
    return getattr(model, PYRAMID_ATTRIBUTE).config


def _dpn_config(model: nn.Module, knob: str) -> PyramidConfig:
    """The config of ``model``'s DPN, to change an inference-time knob of its routers; ``knob`` says
    what it does, for the error when the model runs another strategy."""
    config = get_pyramid_config(model)
    if config.strategy != "dpn":
        raise ValueError(f"{knob} a DPN's routers; this model runs {config.strategy!r}")
    return config


def set_router_bias(model: nn.Module, bias: float) -> None:
    """Set the router bias of ``model``'s DPN (saved with it by ``dpn.save_pyramid``)."""
    _dpn_config(model, "the router bias moves").router_bias = float(bias)


def set_probability_scale(model: nn.Module, scale: str) -> None:
    """Change how ``model``'s DPN scales pooled tokens by the router probability (``PyramidConfig.
    probability_scale``), e.g. ``"train_only"`` to evaluate a DPN trained the paper's way unscaled."""
    if scale not in PROBABILITY_SCALES:
        raise ValueError(f"probability_scale must be one of {PROBABILITY_SCALES}, got {scale!r}")
    _dpn_config(model, "probability_scale applies to").probability_scale = scale


def save_pyramid(model: nn.Module, directory: str | Path) -> Path:
    """Write ``pyramid_config.json`` and the router weights (safetensors) into ``directory``."""
    pyramid = getattr(model, PYRAMID_ATTRIBUTE, None)
    if not has_pyramid(model):
        raise ValueError("this model has no pyramid to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pyramid.config.save(directory / CONFIG_NAME)
    state = {k: v.detach().contiguous().cpu() for k, v in pyramid.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata=_fingerprint(model))
    return directory


def load_pyramid(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the pyramid saved in ``directory`` to ``model`` (replacing any pyramid it has).

    Raises ``ValueError`` when the files are missing, corrupted, or were saved for a model of a
    different depth, width or visual grid.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no pyramid weights at {weights}; save them with dpn.save_pyramid")
    config = PyramidConfig.load(directory / CONFIG_NAME)
    state, saved_for = _read_weights(weights)
    expected = _fingerprint(model)
    mismatched = {k: (saved_for.get(k), v) for k, v in expected.items() if saved_for.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: saved for {a}, this model has {b}" for k, (a, b) in mismatched.items())
        raise ValueError(f"the pyramid in {directory} was saved for a different model ({details})")
    if has_pyramid(model):
        remove_pyramid(model)
    apply_pyramid(model, config)
    _load_weights_into(getattr(model, PYRAMID_ATTRIBUTE), state, weights)
    return model


def load_pyramid_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load saved router weights into the pyramid ``model`` already has (same config), in place.

    Parameters keep their identity, so an optimizer built on them stays valid (resuming training).
    """
    if not has_pyramid(model):
        raise ValueError("this model has no pyramid to load weights into")
    directory = Path(directory)
    saved = PyramidConfig.load(directory / CONFIG_NAME)
    if saved != get_pyramid_config(model):
        raise ValueError(f"the pyramid saved in {directory} has a different config from the model's")
    state, _ = _read_weights(directory / WEIGHTS_NAME)
    _load_weights_into(getattr(model, PYRAMID_ATTRIBUTE), state, directory / WEIGHTS_NAME)
    return model


def _load_weights_into(pyramid: Strategy, state: dict[str, torch.Tensor], weights: Path) -> None:
    own = pyramid.state_dict()
    if set(own) != set(state):
        raise ValueError(
            f"{weights} holds keys {sorted(set(state) ^ set(own))} that do not match the pyramid of its config"
        )
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise ValueError(f"{weights}: {key} has shape {tuple(tensor.shape)}, expected {tuple(own[key].shape)}")
    pyramid.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {err}") from err
    return state, metadata


def _fingerprint(model: nn.Module) -> dict[str, str]:
    adapter = get_adapter(model)
    return {
        "model_type": str(model.config.model_type),
        "num_layers": str(adapter.num_layers(model.config)),
        "hidden_size": str(adapter.hidden_size(model.config)),
        "visual_grid": json.dumps(list(adapter.visual_grid(model.config))),
    }


def _pyramid_keys(pyramid: Strategy) -> list[str]:
    return [f"{PYRAMID_ATTRIBUTE}.{key}" for key in pyramid.state_dict()]
