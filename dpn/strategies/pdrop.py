"""PyramidDrop (arXiv 2410.17247): at several depths (DPN's, 1/4, 1/2, 3/4), each stage keeps a
ratio (0.5 by default) of the visual tokens left, ranked by the last prompt token's attention."""

from __future__ import annotations

from dataclasses import dataclass

from dpn.geometry import ModelGeometry
from dpn.strategies.base import fraction_spec, register_spec, register_strategy
from dpn.strategies.schedule import paper_stage_layers
from dpn.strategies.selection import AttentionSelection, SelectionConfig, SelectionStage

PDROP_KEEP_RATIO = 0.5


@dataclass
class PDropConfig(SelectionConfig):
    name = "pdrop"


def preset(geometry: ModelGeometry, keep_ratio: float = PDROP_KEEP_RATIO, **options) -> dict:
    stages = [SelectionStage(layer, keep_ratio=keep_ratio) for layer in paper_stage_layers(geometry.num_layers)]
    return {"stages": stages, "strategy": PDropConfig(**options)}


register_strategy("pdrop", PDropConfig, AttentionSelection)
register_spec("pdrop", fraction_spec("pdrop", preset), "pdrop[:KEEP]")
