"""Fitting DPN's routers to the path each sample is best served by: credit assignment by sweeping paths.

The paper's routers learn through the probability that scales the pooled tokens, a gradient that
says how much the loss cares about the tokens' magnitude, not whether the expert was a good choice
(docs/RESULTS.md measures what that gives). Here each labelled sample is run once per routing path
(one expert per stage, forced, no gradients): its LM loss on the supervised tokens and its LLM
FLOPs ratio. The path minimising ``loss + flops_weight x FLOPs ratio`` is the sample's target. Each
stage's router then learns, from what it reads when the earlier stages followed the target, to
predict the cost of each of its experts (the cheapest path continuing with it); it picks the expert
of least predicted cost. Nothing else in the model changes.

Used by ``router_training="fit"`` pyramids (``dpn.presets.fitted``), whose LLM was fine-tuned on
uniformly drawn paths so that every path is one it knows; ``dpn train`` fits after training.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpn.api import get_pyramid
from dpn.supervision import IGNORE_INDEX

# Router training on the collected (input, target) pairs: full passes over them, rows per step, Adam's rate.
FIT_EPOCHS = 30
FIT_BATCH_SIZE = 64
FIT_LEARNING_RATE = 3e-3


@dataclass
class PathSweep:
    """One batch run under every routing path.

    Attributes:
        paths: the expert of each stage, per path (every combination of the stages' experts).
        losses: (paths, batch) mean LM loss over each sample's supervised tokens (NaN: none).
        flops: (paths, batch) LLM prefill FLOPs ratio of each sample.
        router_inputs: per path, per stage, (batch, d) what the stage's router read (zeros where the
            sample was not routed at that stage).
        routed: (paths, batch, stages) whether the routers decide for the sample at each stage on each
            path (a grid that an earlier stage pooled below ``min_tokens_to_pool`` is not routed).
    """

    paths: list[tuple[int, ...]]
    losses: torch.Tensor
    flops: torch.Tensor
    router_inputs: list[list[torch.Tensor]]
    routed: torch.Tensor


@dataclass
class FitReport:
    """What fitting did: how many samples, per stage the share of samples whose cheapest expert is
    each expert, and the fitted router's mean regret on the samples it learned from (the cost of
    its pick minus the cheapest, in loss units); a stage no sample reached has none."""

    samples: int
    target_shares: list[list[float]]
    regret: list[float | None]


def all_paths(model) -> list[tuple[int, ...]]:
    """Every combination of one expert per stage of ``model``'s pooling pyramid."""
    strategy = get_pyramid(model)
    choices = [strategy.num_choices(stage) for stage in range(len(strategy.config.stages))]
    if not all(choices):
        raise ValueError(f"routing paths exist for pooling pyramids; {strategy.strategy_config.name} has no experts")
    return list(itertools.product(*(range(n) for n in choices)))


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch,) mean next-token cross-entropy over each sample's supervised labels (NaN where none)."""
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets.masked_fill(~supervised, 0),
                             reduction="none")
    counts = supervised.sum(1)
    total = (losses * supervised).sum(1)
    return torch.where(counts > 0, total / counts.clamp(min=1), torch.full_like(total, float("nan")))


@contextmanager
def _recording_router_inputs(strategy) -> Iterator[list]:
    """Record, per stage, the rows each router reads during one forward (one row per routed sample,
    in batch order; the forward's ``routing.experts`` says which samples they were)."""
    recorded: list[torch.Tensor | None] = [None] * len(strategy.routers)

    def hook(stage):
        def record(module, args):
            recorded[stage] = args[0].detach()
        return record

    handles = [router.register_forward_pre_hook(hook(stage)) for stage, router in enumerate(strategy.routers)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def sweep_paths(model, batch: dict[str, torch.Tensor]) -> PathSweep:
    """Run ``batch`` (with ``labels``) under every routing path of ``model``'s DPN, without gradients."""
    strategy = get_pyramid(model)
    if not hasattr(strategy, "routers"):
        raise ValueError(f"fitting routers needs a DPN pyramid; this model's is {strategy.strategy_config.name!r}")
    if batch.get("labels") is None:
        raise ValueError("sweeping paths needs labels (the LM loss of each path)")
    paths = all_paths(model)
    losses, flops, inputs, routed = [], [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for path in paths:
                with _recording_router_inputs(strategy) as recorded:
                    out = model(**batch, force_experts=list(path), use_cache=False)
                losses.append(per_sample_loss(out.logits, out.labels))
                flops.append(out.routing.flops_ratio.float())
                routed.append(out.routing.experts >= 0)
                inputs.append([_placed(recorded[stage], routed[-1][:, stage], strategy.geometry.hidden_size)
                               for stage in range(len(recorded))])
    finally:
        model.train(was_training)
    return PathSweep(paths, torch.stack(losses), torch.stack(flops), inputs, torch.stack(routed))


def _placed(rows: torch.Tensor | None, routed: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, d): the router's rows at the samples it read them for (they come in batch order)."""
    placed = torch.zeros(routed.shape[0], width, device=routed.device)
    if rows is not None:
        placed[routed] = rows.float()
    return placed


def target_paths(sweep: PathSweep, flops_weight: float) -> torch.Tensor:
    """(batch,) index into ``sweep.paths`` of each sample's cheapest path by loss + weight x FLOPs
    (-1 for samples without supervised tokens)."""
    cost = _path_costs(sweep, flops_weight)
    return torch.where(torch.isinf(cost).all(0), -1, cost.argmin(0))


def _path_costs(sweep: PathSweep, flops_weight: float) -> torch.Tensor:
    """(paths, batch) loss + weight x FLOPs ratio; inf where a sample has no supervised token."""
    return torch.nan_to_num(sweep.losses + flops_weight * sweep.flops, nan=float("inf"))


def stage_costs(sweep: PathSweep, flops_weight: float, stage: int, targets: torch.Tensor) -> torch.Tensor:
    """(batch, experts) the cost of each expert at ``stage`` for each sample whose earlier stages
    follow its target path: the cheapest path that continues with that expert."""
    cost = _path_costs(sweep, flops_weight)
    paths = torch.tensor(sweep.paths, device=cost.device)  # (paths, stages)
    prefix = paths[targets.clamp(min=0), :stage]  # (batch, stage)
    follows = (paths[:, None, :stage] == prefix[None]).all(-1)  # (paths, batch)
    experts = int(paths[:, stage].max()) + 1
    per_expert = []
    for expert in range(experts):
        allowed = follows & (paths[:, stage] == expert)[:, None]
        per_expert.append(torch.where(allowed, cost, torch.full_like(cost, float("inf"))).min(0).values)
    return torch.stack(per_expert, 1)


def fit_routers(model, batches: Iterable[dict[str, torch.Tensor]], flops_weight: float, epochs: int = FIT_EPOCHS,
                learning_rate: float = FIT_LEARNING_RATE, seed: int = 0) -> FitReport:
    """Fit each router of ``model``'s DPN on ``batches`` (labelled, as for training); only the
    routers' weights change.

    Stage by stage, a sample whose earlier stages follow its target path (the cheapest by loss +
    ``flops_weight`` x FLOPs) gives the router what it read there and, per expert, the cost of the
    cheapest path continuing with it. The router learns to predict each expert's cost from what it
    reads, so that where samples look alike it picks the expert that serves them best on average,
    not the one most often best.
    """
    strategy = get_pyramid(model)
    stages = len(strategy.config.stages)
    features: list[list[torch.Tensor]] = [[] for _ in range(stages)]
    costs: list[list[torch.Tensor]] = [[] for _ in range(stages)]
    samples = 0
    for batch in batches:
        sweep = sweep_paths(model, batch)
        targets = target_paths(sweep, flops_weight)
        has_target = targets >= 0
        # Whether each stage routes a sample on its own target path.
        routed = sweep.routed[targets.clamp(min=0), torch.arange(targets.shape[0], device=targets.device)]
        samples += int((has_target & routed.any(1)).sum())
        for stage in range(stages):
            rows = has_target & routed[:, stage]
            if not bool(rows.any()):
                continue
            read = torch.stack([sweep.router_inputs[int(t)][stage][b] for b, t in enumerate(targets.tolist())])
            features[stage].append(read[rows])
            costs[stage].append(stage_costs(sweep, flops_weight, stage, targets)[rows])
    if samples == 0:
        raise ValueError("no sample with an image and supervised tokens to fit the routers on")
    generator = torch.Generator().manual_seed(seed)
    shares, regrets = [], []
    for stage in range(stages):
        if not features[stage]:
            shares.append([])  # no sample reaches this stage with a grid big enough to pool
            regrets.append(None)
            continue
        x, cost = torch.cat(features[stage]), torch.cat(costs[stage])
        best = cost.argmin(1)
        counts = torch.bincount(best.cpu(), minlength=cost.shape[1]).float()
        shares.append((counts / counts.sum()).tolist())
        router = strategy.routers[stage]
        _train_router(router, x, cost, strategy.strategy_config.router_temperature, epochs, learning_rate, generator)
        regrets.append(_regret(router, x, cost))
    return FitReport(samples, shares, regrets)


def _finite(cost: torch.Tensor) -> torch.Tensor:
    """Costs with unreachable experts (inf) set to the sample's worst reachable cost + 1."""
    reachable = torch.isfinite(cost)
    worst = torch.where(reachable, cost, torch.full_like(cost, -float("inf"))).max(1, keepdim=True).values
    return torch.where(reachable, cost, worst + 1)


def _train_router(router, x: torch.Tensor, cost: torch.Tensor, temperature: float, epochs: int, learning_rate: float,
                  generator: torch.Generator) -> None:
    """Train one router so that its logits / ``temperature`` predict minus each expert's cost
    (squared error): it then estimates each expert's expected cost for inputs like ``x``, and its
    argmax is the expert of least expected cost. (Minimising the expected cost of its softmax
    directly saturates on whichever expert wins early.)"""
    parameter = next(router.parameters())
    x = x.to(parameter.device, parameter.dtype)
    cost = _finite(cost).to(parameter.device, torch.float32)
    optimizer = torch.optim.Adam(router.parameters(), lr=learning_rate)
    was_training = router.training
    router.train()
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(x.shape[0], generator=generator).to(x.device)
                for start in range(0, x.shape[0], FIT_BATCH_SIZE):
                    rows = order[start:start + FIT_BATCH_SIZE]
                    predicted = -router(x[rows]).float() / temperature
                    loss = F.mse_loss(predicted, cost[rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
    finally:
        router.train(was_training)


def _regret(router, x: torch.Tensor, cost: torch.Tensor) -> float:
    """Mean over rows of the cost of the router's pick minus the best cost."""
    parameter = next(router.parameters())
    cost = _finite(cost).to(parameter.device)
    with torch.no_grad():
        picked = router(x.to(parameter.device, parameter.dtype)).argmax(-1)
    return float((cost.gather(1, picked[:, None]).squeeze(1) - cost.min(1).values).mean())
