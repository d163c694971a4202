"""DPN's budget control: the budget routing loss (training) and the router bias knob (inference)."""

from __future__ import annotations

import pytest
import torch

import dpn
from dpn.flops import decoder_flops
from dpn.strategies import DynamicPyramid, PoolingStage, StagePlan, TokenCounts
from helpers import batch_of, make_prompt, pixels, tiny_llava


def budget_config(target=0.5, **kwargs):
    return dpn.PyramidConfig(stages=[PoolingStage(1, [(1, 1), (2, 2)]), PoolingStage(3, [(1, 1), (1, 2)])],
                             strategy=dpn.DPNConfig(routing_loss="budget", budget_target=target, **kwargs))


def test_budget_loss_equals_the_expected_flops_by_hand():
    model = tiny_llava()
    text_config = model.config.text_config
    config = budget_config(target=0.5)
    pyramid = DynamicPyramid(config, dpn.geometry_of(model))
    probs = [torch.tensor([[0.25, 0.75], [1.0, 0.0]]), torch.tensor([[0.5, 0.5], [0.0, 1.0]])]
    plans = [StagePlan(router_probs=p, routed=torch.tensor([True, True])) for p in probs]
    text, visual = torch.tensor([10, 20]), torch.tensor([64, 64])
    loss = pyramid.budget_loss(plans, TokenCounts(text=text, visual=visual))
    ratios = []
    for sample, (t, v) in enumerate(zip([10.0, 20.0], [64.0, 64.0])):
        after_first = v * (probs[0][sample, 0] + probs[0][sample, 1] / 4)
        after_second = after_first * (probs[1][sample, 0] + probs[1][sample, 1] / 2)
        layers = [t + v] * 2 + [t + after_first] * 2 + [t + after_second] * 2
        ratios.append(decoder_flops(text_config, layers) / decoder_flops(text_config, [t + v] * 6))
    assert loss.item() == pytest.approx(float(((ratios[0] + ratios[1]) / 2 - 0.5) ** 2), rel=1e-5)


def test_budget_loss_trains_the_routers_toward_the_target():
    model = tiny_llava(seed=2)
    dpn.apply_pyramid(model, budget_config(target=0.3, routing_loss_weight=1.0))
    model.train()
    batch = batch_of([make_prompt(3, 4, seed=s) for s in range(4)])
    labels = batch["input_ids"].clone()
    out = model(**batch, pixel_values=pixels(4), labels=labels)
    out.routing_loss.backward()
    grads = [p.grad for p in model.pyramid.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    # A few steps on the budget loss alone lower the expected FLOPs toward the target.
    optimizer = torch.optim.SGD(model.pyramid.parameters(), lr=50.0)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(**batch, pixel_values=pixels(4), labels=labels).routing_loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def calibration_setup():
    model = tiny_llava(seed=6)
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    batches = [{**batch_of([make_prompt(3 + s, 4, seed=s + 10 * b) for s in range(4)]), "pixel_values": pixels(4, b)}
               for b in range(2)]
    return model, batches


def test_router_bias_moves_flops_monotonically():
    model, batches = calibration_setup()
    ratios = []
    for bias in (-30.0, -1.0, -0.1, 0.0, 0.1, 1.0, 30.0):
        dpn.set_router_bias(model, bias)
        ratios.append(dpn.budget.mean_flops_ratio(model, batches))
    assert all(a >= b - 1e-9 for a, b in zip(ratios, ratios[1:])), ratios
    assert ratios[0] == pytest.approx(1.0) and ratios[-1] < 0.7  # all-keep and all-strongest ends


def test_calibration_meets_the_target_and_refuses_the_unreachable():
    model, batches = calibration_setup()
    bias, ratio = dpn.calibrate_router_bias(model, batches, target=0.8, progress=False)
    assert ratio <= 0.8 and dpn.get_router_bias(model) == bias
    assert dpn.get_pyramid_config(model) == dpn.presets.paper(model.config)  # the knob is not in the config
    assert dpn.budget.mean_flops_ratio(model, batches) == pytest.approx(ratio)
    with pytest.raises(ValueError, match="cannot go below"):
        dpn.calibrate_router_bias(model, batches, target=0.05, progress=False)


def test_router_bias_is_for_dpn_only():
    model = tiny_llava()
    dpn.apply_pyramid(model, dpn.presets.fastv(model.config))
    with pytest.raises(ValueError, match="moves a DPN's routers"):
        dpn.set_router_bias(model, 1.0)


@pytest.mark.parametrize("bias", [float("nan"), float("inf"), -float("inf"), 1e30, "strong", None])
def test_a_router_bias_that_is_not_a_finite_number_is_refused_and_changes_nothing(bias):
    model = tiny_llava(layers=6, seed=0)
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    dpn.set_router_bias(model, 0.5)
    with pytest.raises(ValueError, match="router bias must be (a|within)"):
        dpn.set_router_bias(model, bias)
    with pytest.raises(ValueError, match="router bias must be (a|within)"):
        with dpn.router_bias(model, bias):
            pass
    assert dpn.get_router_bias(model) == 0.5


def test_calibration_resolves_routers_whose_experts_are_nearly_tied():
    """Fitted routers can rank experts by log-probability margins of 1e-3 or less; the calibration
    must still find the bias whose FLOPs come closest to the target from below, as a fine scan does
    (14 halvings of [-30, 30], the old resolution of 0.004, gave 0.567 here for a target of 0.8)."""
    model, batches = calibration_setup()
    with torch.no_grad():
        for router in model.pyramid.routers:
            router.up.weight.mul_(1e-3)  # the last layer: every margin shrinks a thousandfold
    target = 0.8
    scan = []
    for bias in torch.linspace(-1e-4, 1e-4, 41).tolist():  # every decision flips inside this range
        dpn.set_router_bias(model, bias)
        ratio = dpn.budget.mean_flops_ratio(model, batches)
        if ratio <= target:
            scan.append(ratio)
    assert 0.7 < max(scan) < target  # the fine scan finds a bias close below the target
    bias, ratio = dpn.calibrate_router_bias(model, batches, target=target, progress=False)
    assert max(scan) - dpn.budget.CALIBRATION_TOLERANCE <= ratio <= target and abs(bias) < 1e-4
