"""Ready-made pyramids for a model, by function or by spec string (``--pyramid``).

Every preset takes a model or its config (the geometry is read from it) and keyword overrides:
those naming a ``PyramidConfig`` field (``positions``, ``router_input``, ...) go to the shared
config, the others to the strategy's config (``pooling="avg"``, ``router_temperature=5``, ...).

    dpn.presets.paper(model)              # DPN as in the paper, scaled to the model's depth and grid
    dpn.presets.from_spec("fastv:0.25", model)

Spec strings are registered by each strategy (``dpn.strategies.base.register_spec``).
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from dpn.config import PyramidConfig
from dpn.geometry import ModelGeometry
from dpn.models import geometry_of
from dpn.strategies import dpn as dpn_strategy
from dpn.strategies import fastv as fastv_strategy
from dpn.strategies import pdrop as pdrop_strategy
from dpn.strategies import projector as projector_strategy
from dpn.strategies import mixed_experts as mixed_experts_strategy, random_experts, routed_selection as routed_selection_strategy
from dpn.strategies import static as static_strategy
from dpn.strategies.base import registered_specs, spec_entry
from dpn.strategies.fastv import FASTV_KEEP_RATIO, FASTV_LAYER
from dpn.strategies.pdrop import PDROP_KEEP_RATIO

_SHARED = {f.name for f in fields(PyramidConfig)} - {"stages", "strategy"}


def build(preset: dict[str, Any], geometry: ModelGeometry | None = None, **overrides: Any) -> PyramidConfig:
    """A ``PyramidConfig`` from a strategy's preset (``stages``, ``strategy`` and shared fields)
    with ``overrides`` sent to the shared config or the strategy's. With ``geometry``, positions
    default to the family's preferred mode when neither the preset nor the overrides set them."""
    if geometry is not None and "positions" not in preset and "positions" not in overrides:
        overrides = {**overrides, "positions": geometry.position_modes[0]}
    shared = {k: v for k, v in overrides.items() if k in _SHARED}
    own = {k: v for k, v in overrides.items() if k not in _SHARED}
    strategy = preset["strategy"]
    known = {f.name for f in fields(strategy)}
    unknown = sorted(set(own) - known)
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not options of the {strategy.name} strategy or of the pyramid; "
                         f"{strategy.name} takes {sorted(known)}, the pyramid {sorted(_SHARED)}")
    return PyramidConfig(**{**preset, "strategy": replace(strategy, **own) if own else strategy, **shared})


def paper(model: Any, **overrides: Any) -> PyramidConfig:
    """DPN as in the paper: stages after 1/4, 1/2, 3/4 of depth, experts keep / 1x2 / 2x2 (those that
    divide the model's grid), routers on the last prompt token, hinge routing loss."""
    geometry = geometry_of(model)
    return build(dpn_strategy.preset(geometry, **_pooling_arguments(overrides)), geometry, **overrides)


def fitted(model: Any, fit_flops_weight: float = dpn_strategy.DEFAULT_FIT_FLOPS_WEIGHT,
           **overrides: Any) -> PyramidConfig:
    """DPN with fitted routers (see ``dpn.strategies.dpn.fitted_preset``): the paper's stages and
    experts; training fine-tunes the LLM on uniformly drawn paths, then ``dpn.router_fit`` fits each
    router to the path that minimises the sample's LM loss + ``fit_flops_weight`` x FLOPs ratio.
    Pooled tokens keep their window's position."""
    geometry = geometry_of(model)
    preset = dpn_strategy.fitted_preset(geometry, fit_flops_weight, **_pooling_arguments(overrides))
    return build(preset, geometry, **overrides)


def select(model: Any, keep_ratios: tuple[float, ...] = routed_selection_strategy.DEFAULT_KEEP_RATIOS,
           fit_flops_weight: float = dpn_strategy.DEFAULT_FIT_FLOPS_WEIGHT, layer: int = FASTV_LAYER,
           **overrides: Any) -> PyramidConfig:
    """DPN's fitted routers choosing one of ``keep_ratios`` (falling; FastV-ranked tokens) per sample
    after layer ``layer`` - 1 (see ``dpn.strategies.routed_selection``); spec ``select[:W]``."""
    geometry = geometry_of(model)
    preset = routed_selection_strategy.preset(geometry, fit_flops_weight=fit_flops_weight, keep_ratios=keep_ratios, layer=layer)
    return build(preset, geometry, **overrides)


def mixed(model: Any, experts: tuple[Any, ...] = mixed_experts_strategy.DEFAULT_EXPERTS,
          fit_flops_weight: float = dpn_strategy.DEFAULT_FIT_FLOPS_WEIGHT, layer: int = FASTV_LAYER,
          **overrides: Any) -> PyramidConfig:
    """DPN's fitted routers choosing, per sample, one of ``experts`` (``{"pool": [kh, kw]}`` or
    ``{"keep": r}``, from the most tokens left to the fewest) after layer ``layer`` - 1 (see
    ``dpn.strategies.mixed_experts``); spec ``mixed[:W]``."""
    geometry = geometry_of(model)
    preset = mixed_experts_strategy.preset(geometry, fit_flops_weight=fit_flops_weight, experts=experts, layer=layer)
    return build(preset, geometry, **overrides)


def released(model: Any, router_token_id: int, **overrides: Any) -> PyramidConfig:
    """DPN as its code was released (see ``dpn.strategies.dpn.released_preset``): routers on the mean
    of the ``<ROUTER>`` tokens (``dpn.router_token`` adds the token and writes it into prompts),
    training guard ``min_kept_tokens=18``, ``routing_loss="hinge_global"``."""
    geometry = geometry_of(model)
    preset = dpn_strategy.released_preset(geometry, **_pooling_arguments(overrides))
    return build(preset, geometry, router_token_id=router_token_id, **overrides)


def static(model: Any, stride: tuple[int, int], **overrides: Any) -> PyramidConfig:
    """The paper's stages, each with one fixed ``stride`` (DPN's static ablation)."""
    geometry = geometry_of(model)
    return build(static_strategy.preset(geometry, stride, **_pooling_arguments(overrides)), geometry, **overrides)


def random(model: Any, **overrides: Any) -> PyramidConfig:
    """The paper's stages and experts, each sample's expert drawn uniformly (an ablation)."""
    geometry = geometry_of(model)
    return build(random_experts.preset(geometry, **_pooling_arguments(overrides)), geometry, **overrides)


def projector(model: Any, stride: tuple[int, int], **overrides: Any) -> PyramidConfig:
    """One fixed pooling of the visual grid before the first decoder layer."""
    geometry = geometry_of(model)
    config = build(projector_strategy.preset(geometry, stride), geometry, **overrides)
    config.validate_for(geometry)
    return config


def fastv(model: Any, keep_ratio: float = FASTV_KEEP_RATIO, layer: int = FASTV_LAYER, **overrides: Any) -> PyramidConfig:
    """FastV: layers before ``layer`` (its K) see every token; from ``layer`` on, ``keep_ratio`` of them."""
    geometry = geometry_of(model)
    return build(fastv_strategy.preset(geometry, keep_ratio=keep_ratio, layer=layer), geometry, **overrides)


def pdrop(model: Any, keep_ratio: float = PDROP_KEEP_RATIO, **overrides: Any) -> PyramidConfig:
    """PyramidDrop at DPN's stage depths: each stage keeps ``keep_ratio`` of the remaining tokens."""
    geometry = geometry_of(model)
    return build(pdrop_strategy.preset(geometry, keep_ratio=keep_ratio), geometry, **overrides)


def _pooling_arguments(overrides: dict[str, Any]) -> dict[str, Any]:
    """The override that also shapes a pooling preset's stages (which grids are too small to pool)."""
    return {"min_tokens_to_pool": overrides.pop("min_tokens_to_pool")} if "min_tokens_to_pool" in overrides else {}


def reads_router_token(spec: str, model: Any) -> bool:
    """Whether the preset behind spec string ``spec`` reads a dedicated router token (then
    ``from_spec`` needs ``router_token_id``); False for "none" and for config files (they carry theirs)."""
    entry = spec_entry(spec.partition(":")[0]) if spec != "none" else None
    return entry is not None and _reads_router_token(entry.build(geometry_of(model), spec.partition(":")[2] or None))


def _reads_router_token(preset: dict[str, Any]) -> bool:
    return preset.get("router_input", "last_prompt_token") != "last_prompt_token"


def spec_help() -> str:
    """One line naming every spec string (for ``--help``)."""
    return " | ".join(["none", *(entry.usage for entry in registered_specs()), "a path to a pyramid_config.json"])


def from_spec(spec: str, model: Any, **overrides: Any) -> PyramidConfig | None:
    """A config from a spec string (see ``spec_help()``), a path to a pyramid_config.json, or None for
    "none". ``overrides`` go to a spec's preset (``router_token_id`` for the specs that read one)."""
    if not isinstance(spec, str):
        raise ValueError(f"a pyramid spec is a string such as 'fastv:0.5' or 'none' (no pyramid), got {spec!r}; "
                         f"specs: {spec_help()}")
    if spec == "none":
        return None
    name, _, argument = spec.partition(":")
    entry = spec_entry(name)
    if entry is not None:
        geometry = geometry_of(model)
        preset = entry.build(geometry, argument or None)
        if _reads_router_token(preset) and overrides.get("router_token_id") is None:
            raise ValueError(f"pyramid spec {spec!r} reads a <ROUTER> token: pass router_token_id "
                             "(dpn.router_token.add_router_token adds the token; dpn train and dpn eval do it for you)")
        return build(preset, geometry, **overrides)
    path = Path(spec)
    if path.exists():
        return PyramidConfig.load(path)
    raise ValueError(f"pyramid spec {spec!r} is not one of: {spec_help()}")


__all__ = ["build", "fastv", "fitted", "from_spec", "paper", "pdrop", "projector", "random", "reads_router_token", "released",
           "mixed", "select", "spec_help", "static"]
