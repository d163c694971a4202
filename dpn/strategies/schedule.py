"""Where the paper puts its stages: after 1/4, 1/2 and 3/4 of the LLM's depth (DPN, arXiv 2503.20322,
sec. 4: layers 8, 16 and 24 of a 32-layer LLM; PyramidDrop, arXiv 2410.17247, uses the same depths)."""

from __future__ import annotations

import math

PAPER_STAGE_FRACTIONS = (0.25, 0.5, 0.75)


def stage_fraction_layers(num_layers: int, fractions: tuple[float, ...]) -> list[int]:
    """0-indexed layers after which to compress, at the given fractions of depth."""
    return sorted({max(0, math.floor(num_layers * f + 0.5) - 1) for f in fractions})


def paper_stage_layers(num_layers: int) -> list[int]:
    """The paper's stage layers that leave at least one layer after them."""
    layers = [layer for layer in stage_fraction_layers(num_layers, PAPER_STAGE_FRACTIONS) if layer < num_layers - 1]
    if not layers:
        raise ValueError(f"a {num_layers}-layer model is too shallow for a pyramid")
    return layers
