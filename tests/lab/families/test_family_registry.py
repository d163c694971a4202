"""One registration per family: every adapter's family has a lab side, its random inputs and
typical grids agree, and an unknown family is a clear error."""

from __future__ import annotations

import pytest
import torch

from dpn.lab.families.architectures import ARCHITECTURES, image_inputs, image_size_of, model_config, typical_layout
from dpn.lab.families import FamilyImages, family_of, tiny_builders
from dpn.lab.families.base import _FAMILIES
from dpn.models import _ADAPTERS


def test_every_family_the_library_runs_has_a_lab_side():
    assert set(_ADAPTERS) <= set(_FAMILIES)
    assert all(issubclass(family, FamilyImages) and family.model_types for family in _FAMILIES.values())


@pytest.mark.parametrize("preset", sorted(ARCHITECTURES))
def test_random_inputs_take_the_placeholders_of_the_typical_grids(preset):
    config = model_config(preset)
    tokens, inputs = image_inputs(config, image_size_of(preset), 2, torch.Generator().manual_seed(0))
    placeholders = sum(token == config.image_token_id for token in tokens)
    assert placeholders == sum(part.tokens for part in typical_layout(preset))
    assert inputs["pixel_values"].shape[0] >= 2


def test_an_unregistered_family_is_a_clear_error():
    class Config:
        model_type = "gemma3"

    with pytest.raises(ValueError, match="'gemma3'.*known: \\[.*'llava'"):
        family_of(Config())


def test_tiny_models_come_from_the_registrations():
    assert list(tiny_builders()) == ["llava", "qwen2.5-vl", "llava-onevision"]
