"""Inference-time knobs of a trained DPN: the router bias (calibrated to a FLOPs target) and the
probability scaling. They live on the model's DPN module, never in its config.

``router_bias`` adds ``bias x expert scale`` to every router's log-probabilities: at each stage a
larger bias can only move a sample's choice toward a stronger-compressing expert, so the LLM FLOPs
fall as the bias grows. ``calibrate_router_bias`` bisects on the bias until the mean FLOPs ratio
on calibration batches meets a target. ``dpn.save_pyramid`` keeps both settings beside the weights.

    dpn.set_router_bias(model, 2.0)              # until changed
    with dpn.router_bias(model, 2.0): ...        # inside the block only
    with dpn.probability_scale(model, "train_only"): ...
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dpn.api import get_pyramid
from dpn.strategies.base import check_choice
from dpn.strategies.dpn import PROBABILITY_SCALES, DynamicPyramid

# The bias is in log-probability units; beyond this magnitude every router is saturated.
MAX_BIAS = 30.0
# Bisection steps at most: 2 x MAX_BIAS / 2**30 is about 6e-8, finer than the margins of routers that
# were fitted to per-path losses (their experts' log-probabilities can differ by 1e-3 or less).
BISECTION_STEPS = 30
# Calibration stops early once the FLOPs ratio is this close to the target from below.
CALIBRATION_TOLERANCE = 0.002


class UnreachableBudgetError(ValueError):
    """A FLOPs target below what the pyramid reaches with every router at its strongest expert."""


def _dpn_module(model: nn.Module, knob: str) -> DynamicPyramid:
    """``model``'s DPN module; ``knob`` says what the knob does, for the error when the model runs
    another strategy."""
    pyramid = get_pyramid(model)
    if not isinstance(pyramid, DynamicPyramid):
        raise ValueError(f"{knob} a DPN's routers; this model runs {pyramid.strategy_config.name!r}")
    return pyramid


def set_router_bias(model: nn.Module, bias: float) -> None:
    """Set the router bias of ``model``'s DPN (kept by ``dpn.save_pyramid``; the config is unchanged)."""
    _dpn_module(model, "the router bias moves").router_bias = bias  # checked by the module


def get_router_bias(model: nn.Module) -> float:
    return _dpn_module(model, "the router bias moves").router_bias


@contextmanager
def router_bias(model: nn.Module, bias: float) -> Iterator[nn.Module]:
    """Run ``model``'s DPN with ``bias`` inside the block; the previous bias returns after."""
    module = _dpn_module(model, "the router bias moves")
    previous = module.router_bias
    module.router_bias = bias  # checked by the module: a ValueError before the block runs
    try:
        yield model
    finally:
        module.router_bias = previous


def set_probability_scale(model: nn.Module, scale: str | None) -> None:
    """Override how ``model``'s DPN scales pooled tokens by the router probability
    (``DPNConfig.probability_scale``), e.g. ``"train_only"`` to evaluate a DPN trained the paper's
    way unscaled; None returns to the config's."""
    module = _dpn_module(model, "probability_scale applies to")
    if scale is not None:
        check_choice("probability_scale", scale, PROBABILITY_SCALES)
    module.probability_scale_override = scale


@contextmanager
def probability_scale(model: nn.Module, scale: str) -> Iterator[nn.Module]:
    """Run ``model``'s DPN with probability scaling ``scale`` inside the block."""
    module = _dpn_module(model, "probability_scale applies to")
    previous = module.probability_scale_override
    set_probability_scale(model, scale)
    try:
        yield model
    finally:
        module.probability_scale_override = previous


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
    (bisection until within ``CALIBRATION_TOLERANCE`` or ``steps`` halvings); sets it on ``model``
    and returns (bias, ratio).

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
        for _ in _steps(steps, f"calibrating the router bias for {target:.2f} x FLOPs", progress):
            if target - best[1] <= CALIBRATION_TOLERANCE:
                break
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


def _steps(steps: int, description: str, progress: bool) -> Iterable[int]:
    """``range(steps)``, with a progress bar when asked for and tqdm is installed (the library does
    not require it)."""
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return range(steps)
        return tqdm(range(steps), desc=description)
    return range(steps)
