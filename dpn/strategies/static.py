"""Static pyramid: the paper's stages with one fixed pooling stride each (DPN's "static" ablation,
arXiv 2503.20322, table 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpn.geometry import ModelGeometry
from dpn.strategies.base import register_spec, register_strategy
from dpn.strategies.pooling import (
    PAPER_MIN_TOKENS, GridPooling, PoolingConfig, PoolingStage, dividing_stages, paper_pooling_stages, parse_stride,
)


@dataclass
class StaticConfig(PoolingConfig):
    """Every stage has exactly one expert: its fixed stride."""

    name = "static"

    def check_stages(self, stages: list[PoolingStage]) -> None:
        super().check_stages(stages)
        if any(len(s.experts) != 1 for s in stages):
            raise ValueError(f"each stage of a {self.name} config has exactly one expert (its fixed stride)")


class StaticPooling(GridPooling):
    """Every sample takes the stage's one stride."""

    def choose(self, stage, inputs, samples):
        probs = torch.ones(samples.shape[0], 1, device=samples.device)
        return probs, torch.zeros(samples.shape[0], dtype=torch.long, device=samples.device)


def preset(geometry: ModelGeometry, stride: tuple[int, int], min_tokens_to_pool: int = PAPER_MIN_TOKENS,
           **options) -> dict:
    """The paper's stages with ``stride`` at each; a stage where it would not divide the grid left
    by earlier stages is dropped."""
    layers = [stage.layer for stage in paper_pooling_stages(geometry, min_tokens_to_pool)]
    grids = geometry.image_grids or ()
    stages = dividing_stages(grids, layers, [stride], min_tokens_to_pool, keep_single=True)
    if not stages:
        raise ValueError(f"the static stride {stride} divides none of the model's pyramid stages")
    return {"stages": stages, "strategy": StaticConfig(min_tokens_to_pool=min_tokens_to_pool, **options)}


register_strategy("static", StaticConfig, StaticPooling)
register_spec("static", lambda geometry, argument: preset(geometry, parse_stride(f"static:{argument}", argument)),
              "static:KHxKW", plot_style="C0s-")
