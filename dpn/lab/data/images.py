"""Images of a sample as each model family takes them: the placeholder tokens, pixels and sizes.

The data path (``dpn.lab.data.llava``) writes an ``<image>`` placeholder where a sample's image
goes; a family's :class:`FamilyImages` says which text stands for one image in that family's
prompt, how many placeholder tokens each image becomes (its visual tokens), and how a batch's
images are stacked for the model's forward:

- LLaVA-1.5: a fixed grid per image; ``pixel_values`` stacked.
- Qwen2-VL / Qwen2.5-VL: ``<|vision_start|><|image_pad|><|vision_end|>``; the image processor
  resizes each image to a multiple of the merged patch size, so each image has its own grid
  (``image_grid_thw``); the patch rows of every image are concatenated.
- LLaVA-NeXT / OneVision: the base grid plus the unpadded high-resolution grid with row newlines
  (counted by the adapter's own layout rule); crops are zero-padded to the batch's most crops,
  ``image_sizes`` tell the model what is real, and OneVision gets ``batch_num_images`` (it does
  not tile the images of a sample with several).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from dpn.models import geometry_of, get_adapter


@dataclass
class SampleImages:
    """One sample's images, encoded: the model inputs they need, and each image's placeholder tokens."""

    tensors: dict[str, torch.Tensor]
    tokens: list[int]


class FamilyImages(ABC):
    """A family's image side of the data path, built from the model's config and its processor."""

    def __init__(self, config: Any, processor: Any) -> None:
        self.config = config
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = int(config.image_token_id)

    @property
    def placeholder(self) -> str:
        """The text that stands for one image in a rendered prompt."""
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    @abstractmethod
    def encode(self, images: list[Image.Image]) -> SampleImages:
        """The model inputs and placeholder counts of one sample's images."""

    @abstractmethod
    def collate(self, samples: list[SampleImages]) -> dict[str, torch.Tensor]:
        """The model inputs of a batch's images (``samples``: those with images, in batch order)."""

    def token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token inputs the family's processor returns beside ``input_ids`` (none by default)."""
        return {}

    def _process(self, images: list[Image.Image], **kwargs) -> dict[str, torch.Tensor]:
        return dict(self.image_processor(images=images, return_tensors="pt", **kwargs))


class FixedGridImages(FamilyImages):
    """LLaVA-1.5: every image is one square grid of the vision tower's patches."""

    def __init__(self, config: Any, processor: Any) -> None:
        super().__init__(config, processor)
        self.tokens = geometry_of(config).image_tokens

    def encode(self, images: list[Image.Image]) -> SampleImages:
        return SampleImages({"pixel_values": self._process(images)["pixel_values"]}, [self.tokens] * len(images))

    def collate(self, samples: list[SampleImages]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.cat([s.tensors["pixel_values"] for s in samples])}


class QwenImages(FamilyImages):
    """Qwen2-VL / Qwen2.5-VL: a grid per image, from the processor's resizing."""

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


class AnyResolutionImages(FamilyImages):
    """LLaVA-NeXT / OneVision: a base grid and a high-resolution grid per image."""

    def encode(self, images: list[Image.Image]) -> SampleImages:
        out = self._process([images])
        per_sample = torch.tensor([len(images)])
        layouts = get_adapter(self.config).image_layouts(self.config, out["image_sizes"], per_sample, None)
        tensors = {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}
        return SampleImages(tensors, [sum(part.tokens for part in layout) for layout in layouts])

    def collate(self, samples: list[SampleImages]) -> dict[str, torch.Tensor]:
        crops = max(s.tensors["pixel_values"].shape[1] for s in samples)
        pixels = [s.tensors["pixel_values"] for s in samples]
        padded = [torch.cat([p, p.new_zeros(p.shape[0], crops - p.shape[1], *p.shape[2:])], 1) for p in pixels]
        batch = {"pixel_values": torch.cat(padded), "image_sizes": torch.cat([s.tensors["image_sizes"] for s in samples])}
        if self.config.model_type == "llava_onevision":
            batch["batch_num_images"] = torch.tensor([len(s.tokens) for s in samples])
        return batch


FAMILY_IMAGES: dict[str, type[FamilyImages]] = {
    "llava": FixedGridImages,
    "qwen2_vl": QwenImages,
    "qwen2_5_vl": QwenImages,
    "llava_next": AnyResolutionImages,
    "llava_onevision": AnyResolutionImages,
}


def family_images(config: Any, processor: Any) -> FamilyImages:
    """The image side of the data path for a model with ``config``, using ``processor``'s parts."""
    family = FAMILY_IMAGES.get(config.model_type)
    if family is None:
        raise ValueError(f"dpn's data path does not know how {config.model_type!r} takes images; "
                         f"known: {sorted(FAMILY_IMAGES)}")
    return family(config, processor)
