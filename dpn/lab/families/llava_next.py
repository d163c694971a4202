"""LLaVA-NeXT / OneVision in the lab: a base grid and the unpadded high-resolution grid with row
newlines per image (counted by the adapter's own layout rule); crops are zero-padded to the
batch's most crops, ``image_sizes`` tell the model what is real, and OneVision gets
``batch_num_images`` (it does not tile the images of a sample with several)."""

from __future__ import annotations

import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from dpn.lab.families import tiny_families
from dpn.lab.families.base import FamilyImages, SampleImages, register_family
from dpn.models import get_adapter


@register_family
class AnyResolutionImages(FamilyImages):
    """A base grid and a high-resolution grid per image."""

    model_types = ("llava_next", "llava_onevision")
    tiny_builders = {"llava-onevision": tiny_families.build_tiny_onevision}

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

    @classmethod
    def random_inputs(cls, config, image_size, batch_size, generator):
        layout = cls.typical_grids(config, image_size)
        vision = config.vision_config
        crops = image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, vision.image_size)
        pixels = torch.randn(batch_size, crops, 3, vision.image_size, vision.image_size, generator=generator)
        return ([config.image_token_id] * sum(part.tokens for part in layout),
                {"pixel_values": pixels, "image_sizes": torch.tensor([list(image_size)] * batch_size)})

    @classmethod
    def typical_grids(cls, config, image_size):
        if image_size is None:
            raise ValueError(f"{config.model_type} images need an image size")
        return get_adapter(config).image_layouts(config, torch.tensor([list(image_size)]), None, None)[0]
