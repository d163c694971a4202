"""What the lab knows about a model family, registered once per family.

The library's adapter (``dpn.models``) says how a family's forward lays out its visual tokens; the
lab also needs, per family, how a sample's images are encoded for the data path (the placeholder
text, the model inputs, each image's visual tokens, how a batch is stacked), random image inputs
for benchmarks on real shapes with random weights, the grids of a typical image for FLOPs tables,
and a tiny random model to test with offline. A family is one :class:`FamilyImages` subclass in
one file of this package, registered with :func:`register_family`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image

# A tiny builder: seed -> (a freshly initialised tiny model of the family, its processor).
TinyBuilder = Callable[[int], tuple[Any, Any]]


@dataclass
class SampleImages:
    """One sample's images, encoded: the model inputs they need, and each image's placeholder tokens."""

    tensors: dict[str, torch.Tensor]
    tokens: list[int]


class FamilyImages(ABC):
    """A family's image side of the data path, built from the model's config and its processor.

    Class attributes: ``model_types`` (the ``config.model_type`` values it serves) and
    ``tiny_builders`` (``dpn tiny --family`` name -> builder; empty: no tiny model).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    tiny_builders: ClassVar[dict[str, TinyBuilder]] = {}

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

    # ------------------------------------------------------------- shapes without a processor
    @classmethod
    @abstractmethod
    def random_inputs(cls, config: Any, image_size: tuple[int, int] | None, batch_size: int,
                      generator: torch.Generator) -> tuple[list[int], dict[str, torch.Tensor]]:
        """One random image per sample: the placeholder tokens one image takes in a prompt, and the
        inputs the model needs besides the prompt (pixels and the family's sizes)."""

    @classmethod
    @abstractmethod
    def typical_grids(cls, config: Any, image_size: tuple[int, int] | None) -> tuple:
        """The grids (``dpn.spans.Grid`` / ``Gap`` parts) of one image of ``image_size`` (None: the
        family's fixed size)."""


_FAMILIES: dict[str, type[FamilyImages]] = {}


def register_family(family: type[FamilyImages]) -> type[FamilyImages]:
    """Make ``family`` the lab's side of every model type in ``family.model_types``."""
    if not family.model_types:
        raise ValueError(f"{family.__name__}.model_types is empty: name the config.model_type values it serves")
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def family_of(config: Any) -> type[FamilyImages]:
    """The registered family of a model with ``config``, or a ValueError that lists the known ones."""
    family = _FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"dpn's lab does not know how {getattr(config, 'model_type', None)!r} takes images; "
                         f"known: {sorted(_FAMILIES)}")
    return family


def family_images(config: Any, processor: Any) -> FamilyImages:
    """The image side of the data path for a model with ``config``, using ``processor``'s parts."""
    return family_of(config)(config, processor)


def tiny_builders() -> dict[str, TinyBuilder]:
    """Every registered tiny model: ``dpn tiny --family`` name -> builder."""
    builders: dict[str, TinyBuilder] = {}
    for family in _FAMILIES.values():
        builders.update(family.tiny_builders)
    return builders


def build_tiny(name: str, seed: int = 0) -> tuple[Any, Any]:
    """A freshly initialised tiny model of family ``name`` and its processor."""
    builders = tiny_builders()
    if name not in builders:
        raise ValueError(f"no tiny model for {name!r}; choose one of {sorted(builders)}")
    return builders[name](seed)
