"""The configuration of a pyramid: what every strategy shares, plus the strategy's own config.

A :class:`PyramidConfig` says where the LLM compresses its visual tokens (``stages``, each of the
strategy's stage type), which strategy runs (``strategy``: a registered ``StrategyConfig`` such as
``DPNConfig`` or ``FastVConfig``, see ``dpn.strategies``), how positions follow the shorter
sequences, which token is each sample's query, and whether samples of similar length run
together. It is saved as ``pyramid_config.json`` beside the strategy's weights (the routers, if
any); files written by version 1 of this format (one flat config for every strategy) still load.
Presets and ``--pyramid`` spec strings: ``dpn.presets``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import dpn.strategies  # noqa: F401  (registers the built-in strategies)
from dpn.geometry import ModelGeometry
from dpn.strategies.base import Stage, StrategyConfig, check_choice, registered_strategies, strategy_entry

CONFIG_NAME = "pyramid_config.json"
CONFIG_VERSION = 3
# "renumber" gives the shortened sequence consecutive positions (the paper); "keep" gives each new
# token the position of the token it stands for (a pooling window's first token, a kept token itself).
POSITION_MODES = ("renumber", "keep")
# "router_token" reads the last dedicated router token of a sample; "router_tokens_mean" (DPN as
# released) the mean of every router token's hidden state (one follows each human turn).
ROUTER_INPUTS = ("last_prompt_token", "router_token", "router_tokens_mean")
READS_ROUTER_TOKENS = ("router_token", "router_tokens_mean")
# What a PyramidConfig runs when it names no strategy: DPN as in the paper.
DEFAULT_STRATEGY = "dpn"


def _default_strategy() -> StrategyConfig:
    return strategy_entry(DEFAULT_STRATEGY).config_class()


@dataclass
class PyramidConfig:
    """Attributes:
        stages: compression points in increasing layer order, of ``strategy.stage_class`` (dicts
            are converted).
        strategy: the strategy and its hyper-parameters (default: DPN as in the paper).
        positions: see ``POSITION_MODES``.
        router_input: the hidden state a sample's query is read from, for the strategies that read
            one (DPN's routers, FastV's and PyramidDrop's ranking): ``"last_prompt_token"`` (the
            token just before the answer), ``"router_token"`` (the last ``router_token_id``) or
            ``"router_tokens_mean"`` (DPN's routers read the mean over every ``router_token_id`` of the
            sample, as the released DPN does; FastV / PyramidDrop rank with the last one).
            ``dpn.router_token`` adds the token to a tokenizer and to chat messages.
        router_token_id: token id of a dedicated ``<ROUTER>`` token (with the router-token inputs).
        group_by_length: after a stage, run samples of similar length together (prefill and
            training), so one sample that kept every token does not set the length for the batch.
            Results are the same either way; only speed differs.
        version: of the file format.
    """

    stages: list[Stage]
    strategy: StrategyConfig = field(default_factory=_default_strategy)
    positions: str = "renumber"
    router_input: str = "last_prompt_token"
    router_token_id: int | None = None
    group_by_length: bool = True
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, StrategyConfig):
            raise ValueError(
                f"strategy must be a strategy config such as dpn.strategies.StaticConfig(), got {self.strategy!r} "
                "(dpn.presets builds whole configs by name)"
            )
        stage_class = self.strategy.stage_class
        self.stages = [stage_class.from_dict(s) if isinstance(s, dict) else s for s in self.stages]
        check_choice("positions", self.positions, POSITION_MODES)
        check_choice("router_input", self.router_input, ROUTER_INPUTS)
        if not self.stages:
            raise ValueError("a pyramid needs at least one stage")
        layers = [s.layer for s in self.stages]
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"stage layers must be strictly increasing, got {layers}")
        if self.reads_router_tokens and self.router_token_id is None:
            raise ValueError(f"router_input={self.router_input!r} needs router_token_id (the id of your <ROUTER> "
                             "token; dpn.router_token.add_router_token adds one)")
        self.strategy.check_stages(self.stages)
        if self.version > CONFIG_VERSION:
            raise ValueError(
                f"pyramid config version {self.version} is newer than this dpn supports ({CONFIG_VERSION}); "
                "upgrade dpn"
            )

    @property
    def strategy_name(self) -> str:
        return self.strategy.name

    @property
    def reads_router_tokens(self) -> bool:
        """Whether queries are read at dedicated router tokens (``router_token_id``) rather than at
        the last prompt token."""
        return self.router_input in READS_ROUTER_TOKENS

    @property
    def averages_router_tokens(self) -> bool:
        """Whether the routers read the mean over every router token of a sample."""
        return self.router_input == "router_tokens_mean"

    def validate_for(self, geometry: ModelGeometry) -> None:
        """Raise ``ValueError`` if this pyramid cannot run on a model of this geometry."""
        if self.positions not in geometry.position_modes:
            raise ValueError(
                f"positions={self.positions!r} is not available for {geometry.model_type} models; use one of "
                f"{geometry.position_modes} (dpn.presets choose {geometry.position_modes[0]!r} for this family)"
            )
        self.strategy.check_geometry(self.stages, geometry)

    # ------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["stages"] = [stage.to_dict() for stage in self.stages]
        data["strategy"] = self.strategy.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PyramidConfig:
        """A config from its JSON form; version-1 files are migrated (their inference-time router
        bias is dropped here: ``read_config`` returns it)."""
        config, inference_state = _from_dict(data)
        if inference_state:
            warnings.warn(f"this version-1 pyramid config sets {sorted(inference_state)}, which now live on the "
                          "model (dpn.load_pyramid restores them); they are not part of the config", stacklevel=2)
        return config

    def save(self, path: str | Path) -> Path:
        """Write the config as JSON. ``path`` may be a directory (then ``pyramid_config.json`` in it)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PyramidConfig:
        return cls.from_dict(_read_json(path))


def read_config(path: str | Path) -> tuple[PyramidConfig, dict[str, str]]:
    """The config at ``path`` (a file or a directory holding ``pyramid_config.json``) and the
    inference-time settings a version-1 file kept in it (its router bias), for the strategy module."""
    return _from_dict(_read_json(path))


def _read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no pyramid config at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); is the file truncated?") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


_SHARED_KEYS = {f.name for f in fields(PyramidConfig)}


def _from_dict(data: dict[str, Any]) -> tuple[PyramidConfig, dict[str, str]]:
    unknown = sorted(set(data) - _SHARED_KEYS - _version_1_keys())
    if unknown:
        raise ValueError(f"unknown pyramid config keys {unknown}; known keys are {sorted(_SHARED_KEYS)}")
    if "version" not in data:
        raise ValueError(f"the pyramid config has no 'version' (dpn writes {CONFIG_VERSION}); add it, or re-save the "
                         "config with dpn")
    inference_state: dict[str, str] = {}
    version = data["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"pyramid config 'version' must be a whole number >= 1, got {version!r}")
    if version > CONFIG_VERSION:
        raise ValueError(f"pyramid config version {version} is newer than this dpn supports ({CONFIG_VERSION}); "
                         "upgrade dpn")
    if version == 1:
        data, inference_state = _migrate_v1(data)
        version = data["version"]
    unknown = sorted(set(data) - _SHARED_KEYS)
    if unknown:
        raise ValueError(f"unknown pyramid config keys {unknown}; known keys are {sorted(_SHARED_KEYS)}")
    if "stages" not in data:
        raise ValueError("pyramid config has no 'stages'")
    strategy = data.get("strategy")
    if not isinstance(strategy, dict) or "name" not in strategy:
        raise ValueError(f"pyramid config 'strategy' must be an object with a 'name', got {strategy!r}")
    config_class = strategy_entry(strategy["name"]).config_class
    if not isinstance(data["stages"], list):
        raise ValueError(f"pyramid config 'stages' must be a list, got {data['stages']!r}")
    if version < CONFIG_VERSION:
        name = strategy["name"]
        strategy = {"name": name, **config_class.upgrade({k: v for k, v in strategy.items() if k != "name"}, version)}
        data = {**data, "version": CONFIG_VERSION}
    return PyramidConfig(**{**data, "strategy": config_class.from_dict(strategy)}), inference_state


# ----------------------------------------------------------------------------- version 1 files
def _version_1_keys() -> set[str]:
    """The keys a version-1 file could hold: it had one flat object with every strategy's fields."""
    keys = {"strategy"}
    for name in registered_strategies():
        keys |= strategy_entry(name).config_class.version_1_keys
    return keys


def _migrate_v1(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Version 1 -> 2: split the flat object into the shared part and the strategy's config (the
    strategy picks its own fields, ``StrategyConfig.from_version_1``; fields that meant nothing to
    it, DPN's router fields on a fastv config say, are dropped)."""
    name = data.get("strategy", DEFAULT_STRATEGY)
    shared = {k: v for k, v in data.items() if k in _SHARED_KEYS and k != "strategy"}
    strategy, inference_state = strategy_entry(name).config_class.from_version_1(data)
    return {**shared, "version": 2, "strategy": {"name": name, **strategy}}, inference_state


__all__ = ["CONFIG_NAME", "CONFIG_VERSION", "PyramidConfig", "read_config"]
