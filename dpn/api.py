"""Public API: put a pyramid on one model instance, take it off, save and load it.

In the spirit of peft: ``apply_pyramid`` patches *that instance* (its ``forward`` and a ``pyramid``
submodule holding the strategy, routers included); no class and no transformers source is
changed. The pyramid's own weights are saved apart from the model's, as
``pyramid_model.safetensors`` beside ``pyramid_config.json``, so a checkpoint written by
``model.save_pretrained`` stays a plain transformers checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dpn.config import CONFIG_NAME, PyramidConfig, read_config
from dpn.models import geometry_of
from dpn.runtime import PyramidForward
from dpn.strategies.base import Strategy, strategy_entry

WEIGHTS_NAME = "pyramid_model.safetensors"
PYRAMID_ATTRIBUTE = "pyramid"
# Keys of the weights file's metadata that are not the model's fingerprint: the strategy's
# inference-time settings (``Strategy.inference_state``) are stored under this prefix.
INFERENCE_PREFIX = "inference."


def has_pyramid(model: nn.Module) -> bool:
    return isinstance(getattr(model, PYRAMID_ATTRIBUTE, None), Strategy)


def get_pyramid(model: nn.Module) -> Strategy:
    """The strategy module of ``model``'s pyramid (its routers, inference settings, config)."""
    if not has_pyramid(model):
        raise ValueError("this model has no pyramid")
    return getattr(model, PYRAMID_ATTRIBUTE)


def apply_pyramid(model: nn.Module, config: PyramidConfig) -> nn.Module:
    """Put the pyramid ``config`` describes on ``model`` (in place) and return the model.

    The model keeps a copy of ``config``: changing the caller's object later changes nothing.
    Raises ``ValueError`` if the architecture is unsupported, a stage is out of range, or a stride
    does not divide the visual grid on some routing path.
    """
    if has_pyramid(model):
        raise ValueError("this model already has a pyramid; call dpn.remove_pyramid(model) first")
    model_or_wrapper, model = model, _unwrapped(model)
    if not isinstance(config, PyramidConfig):
        raise ValueError(f"config must be a dpn.PyramidConfig, got {type(config).__name__}")
    geometry = geometry_of(model)
    config.validate_for(geometry)
    config = copy.deepcopy(config)
    reference = next(iter(model.get_input_embeddings().parameters()))
    strategy = strategy_entry(config.strategy.name).strategy_class(config, geometry)
    strategy = strategy.to(device=reference.device, dtype=reference.dtype)
    strategy.train(model.training)
    _attach(model, strategy)
    return model_or_wrapper


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model a wrapper such as peft's ``PeftModel`` runs (its ``get_base_model()``), which the
    pyramid patches; the wrapper's forward reaches it, and attribute lookups reach the pyramid."""
    base = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if callable(base) else model


def _attach(model: nn.Module, pyramid: Strategy) -> None:
    model.add_module(PYRAMID_ATTRIBUTE, pyramid)
    model.forward = PyramidForward(model)
    # Keep `model.save_pretrained` a vanilla checkpoint; the pyramid saves beside it (save_pyramid).
    model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | set(_pyramid_keys(pyramid))


def remove_pyramid(model: nn.Module) -> nn.Module:
    """Undo ``apply_pyramid``: the model behaves exactly as before it was applied."""
    if not has_pyramid(model):
        raise ValueError("this model has no pyramid to remove")
    model_or_wrapper, model = model, _unwrapped(model)
    pyramid = get_pyramid(model)
    model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save) - set(_pyramid_keys(pyramid))
    delattr(model, PYRAMID_ATTRIBUTE)
    if "forward" in vars(model):
        del model.forward
    return model_or_wrapper


@contextmanager
def pyramid_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the vanilla model inside the block; the same pyramid (same weights) returns after."""
    if not has_pyramid(model):
        yield model
        return
    pyramid = get_pyramid(model)
    remove_pyramid(model)
    try:
        yield model
    finally:
        _attach(_unwrapped(model), pyramid)


def get_pyramid_config(model: nn.Module) -> PyramidConfig:
    """The config of ``model``'s pyramid (the model's own copy: read it, don't change it)."""
    return get_pyramid(model).config


def save_pyramid(model: nn.Module, directory: str | Path) -> Path:
    """Write ``pyramid_config.json`` and the pyramid's weights (safetensors) into ``directory``.

    The weights file's metadata holds the model's fingerprint (to refuse loading into another
    model) and the strategy's inference-time settings (e.g. a DPN's router bias).
    """
    if not has_pyramid(model):
        raise ValueError("this model has no pyramid to save")
    pyramid = get_pyramid(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pyramid.config.save(directory / CONFIG_NAME)
    state = {k: v.detach().contiguous().cpu() for k, v in pyramid.state_dict().items()}
    metadata = {**pyramid.geometry.fingerprint(),
                **{INFERENCE_PREFIX + k: v for k, v in pyramid.inference_state().items()}}
    save_file(state, str(directory / WEIGHTS_NAME), metadata=metadata)
    return directory


def load_pyramid(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the pyramid saved in ``directory`` to ``model`` (replacing any pyramid it has).

    Raises ``ValueError`` when the files are missing, corrupted, or were saved for a model of a
    different depth, width or visual grid. Version-1 files load as they were saved.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no pyramid weights at {weights}; save them with dpn.save_pyramid")
    config, legacy_state = read_config(directory / CONFIG_NAME)
    state, metadata = _read_weights(weights)
    expected = geometry_of(model).fingerprint()
    mismatched = {k: (metadata.get(k), v) for k, v in expected.items() if metadata.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: saved for {a}, this model has {b}" for k, (a, b) in mismatched.items())
        raise ValueError(f"the pyramid in {directory} was saved for a different model ({details})")
    if has_pyramid(model):
        remove_pyramid(model)
    apply_pyramid(model, config)
    pyramid = get_pyramid(model)
    _load_weights_into(pyramid, state, weights)
    pyramid.load_inference_state({**legacy_state, **_inference_state(metadata)})
    return model


def load_pyramid_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load saved pyramid weights into the pyramid ``model`` already has (same config), in place.

    Parameters keep their identity, so an optimizer built on them stays valid (resuming training).
    """
    if not has_pyramid(model):
        raise ValueError("this model has no pyramid to load weights into")
    directory = Path(directory)
    saved, legacy_state = read_config(directory / CONFIG_NAME)
    if saved != get_pyramid_config(model):
        raise ValueError(f"the pyramid saved in {directory} has a different config from the model's")
    state, metadata = _read_weights(directory / WEIGHTS_NAME)
    pyramid = get_pyramid(model)
    _load_weights_into(pyramid, state, directory / WEIGHTS_NAME)
    pyramid.load_inference_state({**legacy_state, **_inference_state(metadata)})
    return model


def _inference_state(metadata: dict[str, str]) -> dict[str, str]:
    return {k[len(INFERENCE_PREFIX):]: v for k, v in metadata.items() if k.startswith(INFERENCE_PREFIX)}


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


def _pyramid_keys(pyramid: Strategy) -> list[str]:
    return [f"{PYRAMID_ATTRIBUTE}.{key}" for key in pyramid.state_dict()]
