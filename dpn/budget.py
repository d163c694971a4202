"""The inference-time budget knob of a trained DPN: one router bias, calibrated to a FLOPs target.

``router_bias`` (see ``PyramidConfig``) adds ``bias x expert scale`` to every router's
log-probabilities: at each stage a larger bias can only move a sample's choice toward a
stronger-compressing expert, so the LLM FLOPs fall as the bias grows. ``calibrate_router_bias``
bisects on the bias until the mean FLOPs ratio on calibration batches meets a target.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from dpn.api import set_router_bias

# The bias is in log-probability units; beyond this magnitude every router is saturated.
MAX_BIAS = 30.0
BISECTION_STEPS = 14


class UnreachableBudgetError(ValueError):
    """A FLOPs target below what the pyramid reaches with every router at its strongest expert."""


@torch.no_grad()
def mean_flops_ratio(model: nn.Module, batches: Iterable[dict]) -> float:
    """Mean per-sample LLM prefill FLOPs ratio (pyramid / vanilla) over ``batches``."""
    ratios = []
    for batch in batches:
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        ratios.append(out.routing.flops_ratio)
    if not ratios:
        raise ValueError("no calibration batches")
    return float(torch.cat(ratios).mean())


def calibrate_router_bias(
    model: nn.Module, batches: list[dict], target: float, steps: int = BISECTION_STEPS, progress: bool = True
) -> tuple[float, float]:
    """The router bias whose mean FLOPs ratio on ``batches`` is closest to ``target`` from below
    (or the smallest ratio reachable above it); sets it on ``model`` and returns (bias, ratio).

    Raises ``UnreachableBudgetError`` (a ``ValueError``) when ``target`` is below what the pyramid
    reaches at full compression.
    """
    if not 0 < target <= 1:
        raise ValueError(f"the FLOPs target is a fraction of the vanilla model's in (0, 1], got {target}")
    was_training = model.training
    model.eval()
    try:
        set_router_bias(model, MAX_BIAS)
        lowest = mean_flops_ratio(model, batches)
        if lowest > target + 1e-9:
            raise UnreachableBudgetError(
                f"this pyramid cannot go below {lowest:.3f} of the vanilla FLOPs on these samples; "
                f"ask for a target >= {lowest:.3f}"
            )
        low, high, best = -MAX_BIAS, MAX_BIAS, (MAX_BIAS, lowest)
        for _ in tqdm(range(steps), desc=f"calibrating the router bias for {target:.2f} x FLOPs", disable=not progress):
            middle = (low + high) / 2
            set_router_bias(model, middle)
            ratio = mean_flops_ratio(model, batches)
            if ratio <= target:
                best, high = (middle, ratio), middle
            else:
                low = middle
        set_router_bias(model, best[0])
        return best
    finally:
        model.train(was_training)
