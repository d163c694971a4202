"""Qwen2-VL / Qwen2.5-VL in the lab: ``<|vision_start|><|image_pad|><|vision_end|>`` per image; the
image processor resizes each image to a multiple of the merged patch size, so each image has its
own grid (``image_grid_thw``); the patch rows of every image are concatenated."""

from __future__ import annotations

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from dpn.lab.families import tiny_families
from dpn.lab.families.base import FamilyImages, SampleImages, register_family
from dpn.models.qwen2_vl import frame_grids
from dpn.spans import Grid


@register_family
class QwenImages(FamilyImages):
    """A grid per image, from the processor's resizing."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    tiny_builders = {"qwen2.5-vl": tiny_families.build_tiny_qwen2_5_vl}

    @property
    def placeholder(self) -> str:
        start, pad, end = self.tokenizer.convert_ids_to_tokens(
            [self.config.vision_start_token_id, self.image_token_id, self.config.vision_end_token_id])
        return f"{start}{pad}{end}"

    def encode(self, images: list[Image.Image]) -> SampleImages:
        out = self._process(images)
        merge = self.config.vision_config.spatial_merge_size
        tokens = [int(t * h * w) // merge**2 for t, h, w in out["image_grid_thw"].tolist()]
        return SampleImages({"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, tokens)

    def collate(self, samples: list[SampleImages]) -> dict[str, torch.Tensor]:
        return {key: torch.cat([s.tensors[key] for s in samples]) for key in ("pixel_values", "image_grid_thw")}

    def token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # Which tokens are image tokens (1) or text (0): the stock model and generate read its
        # 3-axis positions from them.
        return {"mm_token_type_ids": (input_ids == self.image_token_id).int()}

    @staticmethod
    def _patch_grid(config, image_size: tuple[int, int] | None) -> tuple[int, int]:
        """Patch rows and columns of an image of ``image_size`` after the processor's resizing."""
        if image_size is None:
            raise ValueError(f"{config.model_type} images need an image size")
        vision = config.vision_config
        height, width = smart_resize(*image_size, factor=vision.patch_size * vision.spatial_merge_size)
        return height // vision.patch_size, width // vision.patch_size

    @classmethod
    def random_inputs(cls, config, image_size, batch_size, generator):
        vision = config.vision_config
        rows, cols = cls._patch_grid(config, image_size)
        tokens = ([config.vision_start_token_id] + [config.image_token_id] * (rows * cols // vision.spatial_merge_size**2)
                  + [config.vision_end_token_id])
        pixels = torch.randn(batch_size * rows * cols, 3 * vision.temporal_patch_size * vision.patch_size**2,
                             generator=generator)
        return tokens, {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, rows, cols]] * batch_size)}

    @classmethod
    def typical_grids(cls, config, image_size):
        rows, cols = cls._patch_grid(config, image_size)
        merge = config.vision_config.spatial_merge_size
        return tuple(Grid(*grid) for grid in frame_grids(torch.tensor([[1, rows, cols]]), merge)[0])
