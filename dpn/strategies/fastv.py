"""FastV (arXiv 2403.06764): from layer K on, keep the visual tokens the last prompt token attended
to most in layer K - 1 (one stage after layer K - 1; K = 2 and half the tokens by default)."""

from __future__ import annotations

from dataclasses import dataclass

from dpn.geometry import ModelGeometry
from dpn.strategies.base import fraction_spec, register_spec, register_strategy
from dpn.strategies.selection import AttentionSelection, SelectionConfig, SelectionStage

# FastV's defaults: prune from layer K = 2 on, keeping half of the visual tokens.
FASTV_LAYER = 2
FASTV_KEEP_RATIO = 0.5


@dataclass
class FastVConfig(SelectionConfig):
    name = "fastv"

    def check_stages(self, stages: list[SelectionStage]) -> None:
        super().check_stages(stages)
        if len(stages) != 1:
            raise ValueError(f"fastv prunes once: give one stage, got {len(stages)} (use pdrop for several)")


def preset(geometry: ModelGeometry, keep_ratio: float = FASTV_KEEP_RATIO, layer: int = FASTV_LAYER, **options) -> dict:
    """Layers before ``layer`` (FastV's K) see every token; from ``layer`` on, ``keep_ratio`` of them."""
    if not 1 <= layer < geometry.num_layers:
        raise ValueError(
            f"fastv's layer K must be in 1..{geometry.num_layers - 1} for a {geometry.num_layers}-layer model, got {layer}"
        )
    return {"stages": [SelectionStage(layer - 1, keep_ratio=keep_ratio)], "strategy": FastVConfig(**options)}


register_strategy("fastv", FastVConfig, AttentionSelection)
register_spec("fastv", fraction_spec("fastv", preset), "fastv[:KEEP]")
