"""FastV (arXiv 2403.06764; reference: pkunlp-icler/FastV, its patched ``modeling_llama.py``).

In the paper's terms: after layer K the model drops the share R of the visual tokens that the last
prompt token attended to least inside layer K - 1 (mean over heads), so layers 0..K-1 see every
token and layers K.. see the (1 - R) share kept. K = 2, R = 50% is the usual setting. Here a stage
after layer K - 1 (0-indexed) keeps ``keep_ratio`` = 1 - R of each image's tokens. Text is never
dropped, and kept tokens **keep their original position ids** (the text after the image too), as
the reference does: the preset sets ``positions="keep"``. With a KV cache it prunes once, at
prefill.

Spec strings: ``fastv`` (K=2, R=0.5), ``fastv:KEEP`` (the kept share, 1 - R), or the paper's form
``fastv:K=2,R=0.75`` (R: the share *dropped*).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpn.geometry import ModelGeometry
from dpn.strategies.base import parse_fraction_argument, register_spec, register_strategy
from dpn.strategies.selection import AttentionSelection, SelectionConfig, SelectionStage

# FastV's defaults: prune from layer K = 2 on, dropping R = 50% of the visual tokens.
FASTV_LAYER = 2
FASTV_KEEP_RATIO = 0.5
FASTV_POSITIONS = "keep"


@dataclass
class FastVConfig(SelectionConfig):
    name = "fastv"

    def check_stages(self, stages: list[SelectionStage]) -> None:
        super().check_stages(stages)
        if len(stages) != 1:
            raise ValueError(f"fastv prunes once: give one stage, got {len(stages)} (use pdrop for several)")


def check_layer_k(name: str, layer: int, geometry: ModelGeometry) -> None:
    """A ValueError naming ``name`` unless ``layer`` can be FastV's K for this model: a stage after
    layer K - 1 needs a layer before it and one after it."""
    if not 1 <= layer < geometry.num_layers:
        raise ValueError(
            f"{name}'s layer K must be in 1..{geometry.num_layers - 1} for a {geometry.num_layers}-layer model, got {layer}"
        )


def preset(geometry: ModelGeometry, keep_ratio: float = FASTV_KEEP_RATIO, layer: int = FASTV_LAYER, **options) -> dict:
    """Layers before ``layer`` (FastV's K) see every token; from ``layer`` on, ``keep_ratio`` (1 - R) of them."""
    check_layer_k("fastv", layer, geometry)
    if FASTV_POSITIONS not in geometry.position_modes:
        raise ValueError(f"{geometry.model_type} does not support positions={FASTV_POSITIONS!r}, which FastV needs")
    return {"stages": [SelectionStage(layer - 1, keep_ratio=keep_ratio)], "strategy": FastVConfig(**options),
            "positions": FASTV_POSITIONS}


def parse_spec(geometry: ModelGeometry, argument: str | None) -> dict:
    """``fastv``, ``fastv:KEEP`` or ``fastv:K=2,R=0.5`` (either key may be left out)."""
    spec = f"fastv:{argument}"
    if not argument:
        return preset(geometry)
    if "=" not in argument:
        return preset(geometry, keep_ratio=parse_fraction_argument(spec, argument))
    values = {}
    for item in argument.split(","):
        key, _, value = item.partition("=")
        key = key.strip().upper()
        if key not in ("K", "R") or not value or key in values:
            raise ValueError(f"pyramid spec {spec!r}: write K=<layer>,R=<share dropped>, e.g. fastv:K=2,R=0.5")
        values[key] = value.strip()
    options = {}
    if "K" in values:
        if not values["K"].isdigit():
            raise ValueError(f"pyramid spec {spec!r}: K is a layer number, got {values['K']!r}")
        options["layer"] = int(values["K"])
    if "R" in values:
        try:
            dropped = float(values["R"])
        except ValueError as err:
            raise ValueError(f"pyramid spec {spec!r}: R is the share of visual tokens dropped, got {values['R']!r}") \
                from err
        if not 0 <= dropped < 1:
            raise ValueError(f"pyramid spec {spec!r}: R (the share dropped) must be in [0, 1), got {dropped}")
        options["keep_ratio"] = 1 - dropped
    return preset(geometry, **options)


register_strategy("fastv", FastVConfig, AttentionSelection)
register_spec("fastv", parse_spec, "fastv[:KEEP | :K=2,R=0.5]", plot_style="C2v-")
