"""Projector-side pooling: one fixed pooling of the visual grid before the first decoder layer, the
direct-compression family (TokenPacker-like) that DPN argues against (arXiv 2503.20322, sec. 1)."""

from __future__ import annotations

from dataclasses import dataclass

from dpn.geometry import ModelGeometry
from dpn.strategies.base import BEFORE_FIRST_LAYER, register_spec, register_strategy
from dpn.strategies.pooling import PoolingConfig, PoolingStage, parse_stride
from dpn.strategies.static import StaticPooling


@dataclass
class ProjectorConfig(PoolingConfig):
    """One stage at layer -1 with one stride."""

    name = "projector"

    def allows_layer_before_first(self) -> bool:
        return True

    def check_stages(self, stages: list[PoolingStage]) -> None:
        super().check_stages(stages)
        if len(stages) != 1 or stages[0].layer != BEFORE_FIRST_LAYER or len(stages[0].experts) != 1:
            raise ValueError(
                f"projector compression is one stage at layer {BEFORE_FIRST_LAYER} (before the LLM) with one stride"
            )


def preset(geometry: ModelGeometry, stride: tuple[int, int], **options) -> dict:
    return {"stages": [PoolingStage(BEFORE_FIRST_LAYER, [stride])], "strategy": ProjectorConfig(**options)}


register_strategy("projector", ProjectorConfig, StaticPooling)
register_spec("projector",
              lambda geometry, argument: preset(geometry, parse_stride(f"projector:{argument}", argument)),
              "projector:KHxKW", plot_style="C1^-")
