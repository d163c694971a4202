"""LLaVA-1.5 in the lab: every image is one square grid of the vision tower's patches."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from dpn.lab.families import zoo
from dpn.lab.families.base import FamilyImages, SampleImages, register_family
from dpn.models import geometry_of
from dpn.spans import Grid


@register_family
class FixedGridImages(FamilyImages):
    """``pixel_values`` stacked; each image is ``geometry.image_tokens`` placeholder tokens."""

    model_types = ("llava",)
    tiny_builders = {"llava": zoo.build_tiny}

    def __init__(self, config: Any, processor: Any) -> None:
        super().__init__(config, processor)
        self.tokens = geometry_of(config).image_tokens

    def encode(self, images: list[Image.Image]) -> SampleImages:
        return SampleImages({"pixel_values": self._process(images)["pixel_values"]}, [self.tokens] * len(images))

    def collate(self, samples: list[SampleImages]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.cat([s.tensors["pixel_values"] for s in samples])}

    @classmethod
    def random_inputs(cls, config, image_size, batch_size, generator):
        side = config.vision_config.image_size  # fixed: the image size is the tower's
        tokens = [config.image_token_id] * geometry_of(config).image_tokens
        return tokens, {"pixel_values": torch.randn(batch_size, 3, side, side, generator=generator)}

    @classmethod
    def typical_grids(cls, config, image_size):
        return tuple(Grid(rows, cols) for rows, cols in geometry_of(config).image_grids)
