"""The lab's catalogue of model families: one file per family (see ``base``), registered on import
(in this order: ``dpn tiny --family`` lists their tiny models so)."""

from dpn.lab.families import llava, qwen2_vl, llava_next  # noqa: F401,I001  (registers the families)
from dpn.lab.families.base import (
    FamilyImages, SampleImages, build_tiny, family_images, family_of, register_family, tiny_builders,
)

__all__ = ["FamilyImages", "SampleImages", "build_tiny", "family_images", "family_of", "register_family",
           "tiny_builders"]
