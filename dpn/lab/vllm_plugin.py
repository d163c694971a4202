"""dpn's vLLM plugin: serve a pyramid that acts before the LLM (projector pooling) in vLLM.

vLLM loads ``register`` from the ``vllm.general_plugins`` entry point in every process it starts;
it adds two architectures, vLLM's own LLaVA-1.5 (``DpnLlavaForConditionalGeneration``,
``dpn.lab.vllm_llava``) and Qwen2.5-VL (``DpnQwen2_5_VLForConditionalGeneration``,
``dpn.lab.vllm_qwen2_5_vl``) whose image features are pooled as dpn's ``projector`` strategy pools
them, with the prompt given the pooled number of image tokens, so the scheduler, the KV cache and
prefix caching see an ordinary, shorter prompt. A model directory opts in explicitly::

    vllm serve DIR --hf-overrides '{"architectures": ["DpnLlavaForConditionalGeneration"]}'

where ``DIR`` holds the model and the ``pyramid_config.json`` that ``dpn.save_pyramid`` wrote.

This module needs no vLLM: ``ProjectorPooling`` (what the plugin does to the features, and how many
tokens it leaves) is plain dpn and tested without vLLM; only ``register`` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from dpn.config import CONFIG_NAME, PyramidConfig, read_config
from dpn.spans import pool_grid
from dpn.strategies.base import BEFORE_FIRST_LAYER
from dpn.strategies.divprune import DivPruneConfig, max_min_diverse
from dpn.strategies.pooling import pooled_grid
from dpn.strategies.projector import ProjectorConfig
from dpn.strategies.selection import kept_count

# dpn's architectures in vLLM: name -> the class vLLM imports when a model asks for it.
ARCHITECTURES = {
    "DpnLlavaForConditionalGeneration": "dpn.lab.vllm_llava:DpnLlavaForConditionalGeneration",
    "DpnQwen2_5_VLForConditionalGeneration": "dpn.lab.vllm_qwen2_5_vl:DpnQwen2_5_VLForConditionalGeneration",
}
# The position mode vLLM can serve, per family: LLaVA's prompt positions are consecutive (renumbered);
# Qwen2.5-VL's M-RoPE coordinates are computed by the model, and dpn keeps them (its only mode).
RENUMBERED, KEPT = "renumber", "keep"


def register() -> None:
    """vLLM's entry point (``vllm.general_plugins``): add dpn's architectures to vLLM's registry."""
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for name, model_class in ARCHITECTURES.items():
        if name not in supported:
            ModelRegistry.register_model(name, model_class)


@dataclass(frozen=True)
class ProjectorPooling:
    """What a saved projector pyramid does to one image's projected features before the LLM."""

    stride: tuple[int, int]
    pooling: str
    min_tokens_to_pool: int

    @classmethod
    def from_config(cls, config: PyramidConfig, positions: str = RENUMBERED) -> "ProjectorPooling":
        """The pooling of ``config``, or a ValueError saying why vLLM cannot serve it; ``positions`` is
        the mode the family's vLLM model gives the pooled tokens."""
        strategy = config.strategy
        if not isinstance(strategy, ProjectorConfig):
            raise ValueError(
                f"dpn's vLLM plugin serves pyramids that act before the LLM (projector pooling, spec "
                f"projector:KHxKW; on LLaVA also divprune); this one is {strategy.name!r}, which it does not "
                "serve (a strategy that changes the sequence inside the LLM would need per-layer token counts "
                "from vLLM's KV cache manager: docs/serving.md)")
        _check_positions(config, positions)
        (stage,) = config.stages
        assert stage.layer == BEFORE_FIRST_LAYER  # ProjectorConfig.check_stages holds this
        (stride,) = stage.experts
        return cls(tuple(stride), strategy.pooling, strategy.min_tokens_to_pool)

    @classmethod
    def from_model_dir(cls, directory: str | Path, positions: str = RENUMBERED) -> "ProjectorPooling":
        """The pooling saved in ``directory`` (its ``pyramid_config.json``)."""
        return cls.from_config(_saved_config(str(Path(directory).resolve())), positions)

    def window_origins(self, grid: tuple[int, int]) -> tuple[list[int], list[int]]:
        """The row and column, in ``grid``, of each pooled token's window's first (top-left) token:
        the coordinates a kept-position pooled token carries (row-major)."""
        rows, cols = self.grid(grid)
        stride = self.stride if (rows, cols) != grid else (1, 1)
        return ([r * stride[0] for r in range(rows) for _ in range(cols)],
                [c * stride[1] for _ in range(rows) for c in range(cols)])

    def grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The (rows, cols) an image's ``grid`` of visual tokens leaves."""
        return pooled_grid(grid, self.stride, self.min_tokens_to_pool)

    def tokens(self, grid: tuple[int, int]) -> int:
        """How many visual tokens an image's ``grid`` leaves: its placeholders in the prompt."""
        rows, cols = self.grid(grid)
        return rows * cols

    def pool(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(n, rows x cols, d) projected features of n images, row-major -> (n, tokens(grid), d)."""
        n, length, width = features.shape
        if length != grid[0] * grid[1]:
            raise ValueError(f"{length} features per image do not form the {grid[0]}x{grid[1]} grid")
        if self.grid(grid) == grid:  # too few tokens to pool, or stride 1x1
            return features
        pooled = pool_grid(features.reshape(n, grid[0], grid[1], width), self.stride, self.pooling)
        return pooled.reshape(n, -1, width)

    compress = pool  # what every before-the-LLM compression the plugin serves offers


@dataclass(frozen=True)
class DiverseSelection:
    """A saved DivPrune pyramid: each image keeps its most diverse projected features (dpn's own
    ``max_min_diverse``), in their order; a fixed count per image, so the prompt's placeholders are
    known before the features are. Served for LLaVA only: kept tokens are renumbered there, while
    Qwen2.5-VL's kept M-RoPE coordinates would depend on which tokens the features select."""

    keep_ratio: float

    def tokens(self, grid: tuple[int, int]) -> int:
        return kept_count(grid[0] * grid[1], self.keep_ratio)

    def compress(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(n, rows x cols, d) projected features of n images -> (n, tokens(grid), d)."""
        if features.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{features.shape[1]} features per image do not form the {grid[0]}x{grid[1]} grid")
        keep = self.tokens(grid)
        return torch.stack([image[max_min_diverse(image, keep)] for image in features])


def saved_llava_compression(directory: str | Path) -> ProjectorPooling | DiverseSelection:
    """What the pyramid saved in ``directory`` does to a LLaVA-1.5 image before the LLM, as the plugin
    serves it: projector pooling or DivPrune, positions renumbered; anything else is refused."""
    config = _saved_config(str(Path(directory).resolve()))
    if isinstance(config.strategy, DivPruneConfig):
        _check_positions(config, RENUMBERED)
        (stage,) = config.stages
        return DiverseSelection(stage.keep_ratio)
    return ProjectorPooling.from_config(config, RENUMBERED)


def _check_positions(config: PyramidConfig, positions: str) -> None:
    if config.positions != positions:
        raise ValueError(
            f"this pyramid gives its tokens positions={config.positions!r}, but vLLM's model of this family "
            f"gives them {positions!r} (a LLaVA prompt is numbered consecutively); save it with "
            f"positions={positions!r} to serve it on vLLM")


def _saved_config(directory: str) -> PyramidConfig:
    """The config saved in ``directory``, read again only when the file changes (vLLM asks for each
    request's token count)."""
    path = Path(directory) / CONFIG_NAME
    stat = path.stat() if path.is_file() else None
    return _read_saved_config(directory, stat and (stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=64)
def _read_saved_config(directory: str, version: tuple[int, int] | None) -> PyramidConfig:
    path = Path(directory) / CONFIG_NAME
    if version is None:
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}: dpn's vLLM architectures ({', '.join(ARCHITECTURES)}) serve a model "
            "with a before-the-LLM pyramid saved by dpn.save_pyramid (e.g. dpn train --pyramid projector:KHxKW); "
            "serve other models without the override")
    config, _ = read_config(path)
    return config
