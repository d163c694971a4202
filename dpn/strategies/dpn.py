"""Dynamic Pooling Experts: the routers of a Dynamic Pyramid Network (arXiv 2503.20322, sec. 3).

At each stage a small router reads one hidden state per sample (the last prompt token, a
dedicated router token, or the mean over the router tokens after each human turn, as released)
and picks a pooling stride ("expert") for that sample's images. The
pooled tokens are multiplied by the chosen expert's probability, which is the router's gradient
path. A hinge "routing loss" pushes the routers toward confident, strong compression; the LM loss
pushes back on samples that need detail. Instead of the hinge, a "budget" loss pulls the expected
LLM FLOPs toward a target fraction; at inference ``router_bias`` trades accuracy for FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpn.flops import decoder_flops, segment_layer_tokens
from dpn.geometry import ModelGeometry
from dpn.strategies.base import (
    SpecBuilder, StagePlan, TokenCounts, check_choice, check_finite, check_fraction, check_int, fraction_spec, plain_spec,
    register_spec, register_strategy,
)
from dpn.strategies.pooling import (
    PAPER_MIN_TOKENS, GridPooling, PoolingConfig, PoolingStage, paper_pooling_stages, pooled_grid,
)
from dpn.transfer import host_tensor

PAPER_TEMPERATURE = 10.0
# Fitted routers' logits are minus each expert's predicted cost (in LM-loss units): no softening needed.
FITTED_TEMPERATURE = 1.0
PAPER_LOSS_TARGET = 1.5
PAPER_LOSS_WEIGHT = 1e-3
# Router bottleneck: Linear(d, d / 4).
PAPER_ROUTER_REDUCTION = 4
# The released training script re-samples an expert while it would leave fewer visual tokens.
RELEASED_MIN_KEPT_TOKENS = 18
# "hinge_global": the released code's loss, where a list-aliasing bug turns the per-stage hinge into
# one hinge over the mean of every stage's confident compression (the paper states per stage).
ROUTING_LOSSES = ("hinge", "hinge_global", "budget", "none")
# How the chosen expert's probability p scales the pooled tokens: "value" multiplies them by p (the
# paper), "straight_through" by p / stop_gradient(p), which leaves every value as it is and still
# gives the router the gradient through p; "train_only" multiplies by p while training and not at
# inference; "none" leaves them unscaled (the routers then learn from the routing loss alone).
PROBABILITY_SCALES = ("value", "straight_through", "train_only", "none")
# How the routers learn. "gradient" (the paper): in training each sample's expert is drawn from its
# router's probabilities, and the routers learn through the probability that scales the pooled
# tokens and through the routing loss. "fit": in training each sample's expert is drawn uniformly,
# so the LLM learns every path and the routers are left alone; afterwards ``dpn.router_fit``
# fits each router to the path that minimises the sample's LM loss + fit_flops_weight x FLOPs ratio.
ROUTER_TRAININGS = ("gradient", "fit")
# The FLOPs price of router fitting: a path saving 0.1 of the FLOPs is worth 0.05 more LM loss.
DEFAULT_FIT_FLOPS_WEIGHT = 0.5


@dataclass
class DPNConfig(PoolingConfig):
    """The routers and their loss (pooling and ``min_tokens_to_pool``: see ``PoolingConfig``).

    Attributes:
        router_temperature: probabilities are ``softmax(logits / router_temperature)``.
        router_temperature_start: in training, the temperature moves linearly from this (at the
            first step) to ``router_temperature`` (at the last), as the trainer reports progress
            (``DynamicPyramid.set_training_progress``: ``dpn train``'s trainer calls it every step; a
            training loop of your own must too, else the temperature is ``router_temperature``
            throughout); None (the paper): constant.
        sample_in_training: in training mode, sample the expert from the router's probabilities;
            otherwise (and always at inference) take the argmax.
        probability_scale: see ``PROBABILITY_SCALES``.
        routing_loss: ``"hinge"`` (the paper's loss, per stage), ``"hinge_global"`` (one hinge over
            all stages, as the released code computes it), ``"budget"`` (the batch's expected LLM
            FLOPs ratio under the router's probabilities is pulled toward ``budget_target``) or ``"none"``.
        routing_loss_weight: total loss = LM loss + weight * routing loss.
        routing_loss_target: the hinge's target for the mean confident compression per stage.
        budget_target: the FLOPs fraction of the vanilla LLM the ``budget`` loss aims at.
        expert_scales: compression level of each expert, one list per stage (default: its index).
        router_reduction: the router's hidden width is ``hidden_size // router_reduction``.
        min_kept_tokens: while training with sampling, an expert that would leave a sample fewer
            visual tokens than this is not drawn (the released code re-samples until it is not;
            drawing from the probabilities restricted to the other experts is the same
            distribution). None (the paper's text, the default): no guard. When no expert keeps
            enough, the one keeping the most is taken.
        router_training: see ``ROUTER_TRAININGS``. ``"fit"`` needs ``probability_scale="none"`` and
            ``routing_loss="none"`` (the routers take no part in training).
        fit_flops_weight: with ``router_training="fit"``, the price of one unit of FLOPs ratio in LM
            loss when choosing each sample's target path (higher: more compression).
        fit_keep_share: with ``router_training="fit"``, the probability that a stage draws its
            keep-every-token expert in training (the other experts share the rest equally), so the
            full-detail path, which hard questions need, is learnt more often than 1 in E per stage.
            1.0 trains only that path (a plain fine-tune) and leaves the pooled paths training-free.
            None (the default): every expert alike.
    """

    name = "dpn"
    version_1_keys = PoolingConfig.version_1_keys | {
        "router_temperature", "sample_in_training", "scale_by_probability", "probability_scale", "routing_loss",
        "routing_loss_weight", "routing_loss_target", "expert_scales", "router_reduction", "budget_target",
        "router_bias",
    }
    router_temperature: float = PAPER_TEMPERATURE
    router_temperature_start: float | None = None
    sample_in_training: bool = True
    probability_scale: str = "value"
    routing_loss: str = "hinge"
    routing_loss_weight: float = PAPER_LOSS_WEIGHT
    routing_loss_target: float = PAPER_LOSS_TARGET
    budget_target: float | None = None
    expert_scales: list[list[float]] | None = None
    router_reduction: int = PAPER_ROUTER_REDUCTION
    min_kept_tokens: int | None = None
    router_training: str = "gradient"
    fit_flops_weight: float = DEFAULT_FIT_FLOPS_WEIGHT
    fit_keep_share: float | None = None

    @classmethod
    def from_version_1(cls, flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Version 1 had ``scale_by_probability`` (False: now ``probability_scale="none"``) and a
        ``router_bias``, which is now an inference-time setting of the DPN module."""
        own, _ = super().from_version_1(flat)
        own = {k: v for k, v in own.items() if k not in ("scale_by_probability", "router_bias")}
        if flat.get("scale_by_probability") is False:
            own["probability_scale"] = "none"
        inference_state = {"router_bias": repr(float(flat["router_bias"]))} if flat.get("router_bias") else {}
        return own, inference_state

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("probability_scale", self.probability_scale, PROBABILITY_SCALES)
        check_choice("routing_loss", self.routing_loss, ROUTING_LOSSES)
        for name in ("router_temperature", "router_temperature_start"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        check_finite("routing_loss_weight", self.routing_loss_weight)
        if self.routing_loss_weight < 0:
            raise ValueError(f"routing_loss_weight must be >= 0 (0 turns the routing loss off), got "
                             f"{self.routing_loss_weight}: a negative weight would reward keeping every token")
        check_finite("routing_loss_target", self.routing_loss_target)
        check_int("router_reduction", self.router_reduction, 1)
        if self.min_kept_tokens is not None:
            check_int("min_kept_tokens", self.min_kept_tokens, 1)
        check_choice("router_training", self.router_training, ROUTER_TRAININGS)
        check_finite("fit_flops_weight", self.fit_flops_weight)
        if self.fit_flops_weight < 0:
            raise ValueError(f"fit_flops_weight must be >= 0 (0: the lowest loss whatever it costs), got "
                             f"{self.fit_flops_weight}")
        if self.router_training == "fit" and (self.probability_scale != "none" or self.routing_loss != "none"):
            raise ValueError(
                "router_training='fit' trains the LLM on uniformly drawn paths and fits the routers afterwards: it "
                f"needs probability_scale='none' and routing_loss='none' (got {self.probability_scale!r}, "
                f"{self.routing_loss!r}); dpn.presets.fitted sets them"
            )
        if self.fit_keep_share is not None:
            if self.router_training != "fit":
                raise ValueError(f"fit_keep_share={self.fit_keep_share!r} shapes the paths drawn in training for "
                                 "router_training='fit' only; leave it None with router_training='gradient'")
            if not (isinstance(self.fit_keep_share, (int, float)) and 0 <= self.fit_keep_share <= 1):
                raise ValueError(f"fit_keep_share must be a probability in [0, 1], got {self.fit_keep_share!r}")
            self.fit_keep_share = float(self.fit_keep_share)
        if self.routing_loss == "budget":
            if self.budget_target is None:
                raise ValueError("routing_loss='budget' needs budget_target, a FLOPs fraction in (0, 1]; got None")
            self.budget_target = check_fraction("budget_target (routing_loss='budget')", self.budget_target)

    def check_stages(self, stages: list[PoolingStage]) -> None:
        super().check_stages(stages)
        if self.expert_scales is not None and (
            len(self.expert_scales) != len(stages)
            or any(len(sc) != len(st.experts) for sc, st in zip(self.expert_scales, stages))
        ):
            raise ValueError("expert_scales needs one list per stage with one scale per expert")

    def scales(self, stage: int, num_experts: int) -> list[float]:
        if self.expert_scales is not None:
            return [float(s) for s in self.expert_scales[stage]]
        return [float(i) for i in range(num_experts)]


class Router(nn.Module):
    """LayerNorm(d) -> Linear(d, d/r, no bias) -> GELU -> Linear(d/r, E, no bias).

    Linear layers keep PyTorch's default Kaiming-uniform initialisation.
    """

    def __init__(self, hidden_size: int, num_experts: int, reduction: int) -> None:
        super().__init__()
        inner = max(1, hidden_size // reduction)
        self.norm = nn.LayerNorm(hidden_size)
        self.down = nn.Linear(hidden_size, inner, bias=False)
        self.up = nn.Linear(inner, num_experts, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(self.norm(hidden))))


# A router bias shifts log-probabilities (a few nats apart): a shift of this size already pins every
# choice to one end, and much larger ones overflow float32 (bias x scale = inf, then NaN probabilities).
MAX_ROUTER_BIAS = 1e4


def checked_router_bias(bias: Any) -> float:
    """``bias`` as a float, or a ValueError: a NaN bias would make every choice NaN (silently keeping
    every token), and an infinite or huge one overflows the routers' arithmetic."""
    try:
        value = float(bias)
    except (TypeError, ValueError):
        raise ValueError(f"the router bias must be a number, got {bias!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"the router bias must be a finite number, got {bias!r}")
    if abs(value) > MAX_ROUTER_BIAS:
        raise ValueError(f"the router bias must be within ±{MAX_ROUTER_BIAS:g} (every choice is pinned long before), "
                         f"got {bias!r}")
    return value


class DynamicPyramid(GridPooling):
    """The per-stage routers of a pyramid and the pooling they drive.

    Two inference-time settings live on the module, not in the config (see ``dpn.budget``):
    ``router_bias`` (the budget knob) and ``probability_scale_override``. Both are saved beside
    the weights by ``dpn.save_pyramid``.
    """

    reads_query = True
    options: DPNConfig

    def __init__(self, config, geometry: ModelGeometry) -> None:
        super().__init__(config, geometry)
        self.routers = nn.ModuleList(
            Router(geometry.hidden_size, len(stage.experts), self.strategy_config.router_reduction) for stage in config.stages
        )
        self.router_bias = 0.0
        self.probability_scale_override: str | None = None
        self.training_progress = 1.0  # share of training done; only a temperature schedule reads it

    def set_training_progress(self, progress: float) -> None:
        """Where training is (0: first step, 1: last), for ``router_temperature_start``'s schedule;
        set by the trainer at each step (a schedule like the learning rate's, not per-call state)."""
        self.training_progress = min(max(float(progress), 0.0), 1.0)

    @property
    def temperature(self) -> float:
        """The routers' temperature now: the schedule's in training, ``router_temperature`` otherwise."""
        start, end = self.strategy_config.router_temperature_start, self.strategy_config.router_temperature
        if start is None or not self.training:
            return end
        return start + (end - start) * self.training_progress

    @property
    def router_bias(self) -> float:
        return self._router_bias

    @router_bias.setter
    def router_bias(self, bias: float) -> None:
        self._router_bias = checked_router_bias(bias)

    @property
    def probability_scale(self) -> str:
        return self.probability_scale_override or self.strategy_config.probability_scale

    def token_scale(self, probability: torch.Tensor) -> torch.Tensor | None:
        """p (the paper), p / stop_gradient(p) (``straight_through``: values unscaled, same gradient),
        or None: scaling off, or ``train_only`` at inference."""
        mode = self.probability_scale
        if mode == "none" or (mode == "train_only" and not self.training):
            return None
        return probability / probability.detach() if mode == "straight_through" else probability

    def route(self, stage: int, router_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities (n, E) in fp32 and the chosen expert per row (n,).

        ``router_bias`` shifts the log-probabilities by bias x expert scale before the choice,
        moving the pyramid along its accuracy / FLOPs curve without retraining.
        """
        logits = self.routers[stage](router_hidden).float() / self.temperature
        if self.router_bias:
            scales = self.bias_scales(stage)
            logits = torch.log_softmax(logits, dim=-1) + self.router_bias * host_tensor(scales, logits.device,
                                                                                        logits.dtype)
        probs = torch.softmax(logits, dim=-1)
        if self.training and self.strategy_config.router_training == "fit":  # paths drawn blind; the routers wait
            weights = self.fit_draw_weights(stage).to(probs.device)
            choice = torch.multinomial(weights.expand(probs.shape[0], -1), 1).squeeze(-1)
        elif self.training and self.strategy_config.sample_in_training:
            choice = torch.multinomial(probs.detach(), 1).squeeze(-1)
        else:
            choice = probs.argmax(-1)
        return probs, choice

    def bias_scales(self, stage: int) -> list[float]:
        """How far ``router_bias`` moves each expert's log-probability at ``stage`` (times the bias):
        its compression level, ``expert_scales`` or the expert's index."""
        return self.strategy_config.scales(stage, self.num_choices(stage))

    def choose(self, stage, inputs, samples):
        probs, choice = self.route(stage, inputs.router_hidden(samples))
        if self.strategy_config.min_kept_tokens and self.training and self.strategy_config.sample_in_training:
            kept = self.kept_tokens(stage, inputs.spans, samples.tolist())
            allowed = (kept >= self.strategy_config.min_kept_tokens).to(probs.device)
            # Rows where no expert keeps enough take the one that keeps the most.
            most = F.one_hot(kept.argmax(1), kept.shape[1]).to(probs.device, torch.bool)
            allowed = torch.where(allowed.any(1, keepdim=True), allowed, most)
            if self.strategy_config.router_training == "fit":
                weights = self.fit_draw_weights(stage).to(probs.device) * allowed
                # A guard that rules out every expert the draw weighs (share 1.0, keep not allowed) leaves the allowed ones.
                weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, allowed.float())
            else:
                weights = probs.detach() * allowed
            choice = torch.multinomial(weights, 1).squeeze(-1)
        return probs, choice

    def fit_draw_weights(self, stage: int) -> torch.Tensor:
        """(E,) how often ``router_training="fit"`` training draws each expert of ``stage``: equally, or
        ``fit_keep_share`` for the keep-every-token (1x1) expert and the rest shared by the others."""
        shares = self.expert_shares(stage)
        share = self.strategy_config.fit_keep_share
        keeps = [e for e, kept in enumerate(shares) if kept == 1]
        if share is None or not keeps or len(keeps) == len(shares):
            return torch.ones(len(shares))
        weights = torch.full((len(shares),), (1.0 - share) / (len(shares) - len(keeps)))
        weights[keeps] = share / len(keeps)
        return weights

    def expert_shares(self, stage: int) -> list[float]:
        """The share of a grid's visual tokens each expert of ``stage`` keeps (1 / (kh x kw))."""
        return [1.0 / (kh * kw) for kh, kw in self.config.stages[stage].experts]

    def kept_tokens(self, stage: int, spans, samples: list[int]) -> torch.Tensor:
        """(n, E) on the host: the visual tokens each expert would leave each of ``samples``."""
        experts = self.config.stages[stage].experts
        kept = torch.zeros(len(samples), len(experts))
        row = {sample: i for i, sample in enumerate(samples)}
        for k in range(len(spans)):
            if spans.sample[k] not in row:
                continue
            grid = (spans.rows[k], spans.cols[k])
            for e, expert in enumerate(experts):
                rows, cols = self.expert_grid(grid, expert)
                kept[row[spans.sample[k]], e] += rows * cols
        return kept

    def expert_grid(self, grid: tuple[int, int], expert) -> tuple[int, int]:
        """The (rows, cols) ``expert`` leaves of ``grid`` (unchanged below ``min_tokens_to_pool``)."""
        return pooled_grid(grid, expert, self.strategy_config.min_tokens_to_pool)

    @property
    def auxiliary_loss_weight(self) -> float:
        return self.strategy_config.routing_loss_weight

    def auxiliary_loss(self, plans: list[StagePlan], counts: TokenCounts) -> torch.Tensor | None:
        if self.strategy_config.routing_loss in ("hinge", "hinge_global"):
            return self.hinge_loss([p.router_probs[p.routed] for p in plans],
                                   per_stage=self.strategy_config.routing_loss == "hinge")
        if self.strategy_config.routing_loss == "budget":
            return self.budget_loss(plans, counts)
        return None

    def hinge_loss(self, stage_probs: list[torch.Tensor | None], per_stage: bool = True) -> torch.Tensor | None:
        """The paper's hinge: mean over stages of max(0, target - mean_b s[argmax p_b] * max p_b);
        without ``per_stage``, the released code's max(0, target - mean over stages of that mean).

        ``stage_probs`` holds, per stage, the router probabilities of the samples routed there.
        """
        terms = []
        for stage, probs in enumerate(stage_probs):
            if probs is None or probs.shape[0] == 0:
                continue
            scales = host_tensor(self.strategy_config.scales(stage, probs.shape[-1]), probs.device, probs.dtype)
            confidence, expert = probs.max(dim=-1)
            terms.append((scales[expert] * confidence).mean())
        if not terms:
            return None
        target = self.strategy_config.routing_loss_target
        if not per_stage:
            return F.relu(target - torch.stack(terms).mean())
        return F.relu(target - torch.stack(terms)).mean()

    def budget_loss(self, plans: list[StagePlan], counts: TokenCounts) -> torch.Tensor | None:
        """(mean over samples with images of the expected LLM FLOPs ratio - budget_target) squared.

        The expectation is over the router's probabilities, stage by stage: an expert (kh, kw)
        divides the visual tokens by kh * kw. Samples share one budget, so a hard sample may keep
        more tokens when easy ones keep fewer. Per-layer attention uses the expected count too.
        """
        with_images = counts.visual > 0
        if not bool(with_images.any()):
            return None
        visual = counts.visual.float()
        text = counts.text.float()
        segment_tokens = [text + visual]
        for stage, plan in enumerate(plans):
            shrink = host_tensor(self.expert_shares(stage), visual.device, torch.float32)
            factor = torch.where(plan.routed, (plan.router_probs * shrink).sum(-1), torch.ones_like(visual))
            visual = visual * factor
            segment_tokens.append(text + visual)
        layers = self.geometry.num_layers
        layer_tokens = torch.stack(segment_layer_tokens(layers, self.stage_layers, segment_tokens), dim=1)
        expected = decoder_flops(self.geometry.text_config, layer_tokens)
        vanilla = decoder_flops(self.geometry.text_config, segment_tokens[0][:, None].expand_as(layer_tokens))
        ratio = (expected / vanilla)[with_images]
        return (ratio.mean() - self.strategy_config.budget_target) ** 2

    def inference_state(self) -> dict[str, str]:
        state = {}
        if self.router_bias:
            state["router_bias"] = repr(float(self.router_bias))
        if self.probability_scale_override is not None:
            state["probability_scale"] = self.probability_scale_override
        return state

    def load_inference_state(self, state: dict[str, str]) -> None:
        self.router_bias = float(state.get("router_bias", 0.0))
        scale = state.get("probability_scale")
        if scale is not None:
            check_choice("probability_scale", scale, PROBABILITY_SCALES)
        self.probability_scale_override = scale


def preset(geometry: ModelGeometry, min_tokens_to_pool: int = PAPER_MIN_TOKENS, **options) -> dict:
    """The paper's schedule scaled to the model's depth and checked against its visual grid.

    Stages sit after 1/4, 1/2 and 3/4 of the decoder layers (layers 8, 16, 24 of a 32-layer LLM)
    with experts keep / 1x2 / 2x2. An expert that would not divide the visual grid on some routing
    path is dropped from that stage (and a stage left with only 1x1 is dropped), so the preset is
    valid for any grid.
    """
    return {"stages": paper_pooling_stages(geometry, min_tokens_to_pool),
            "strategy": DPNConfig(min_tokens_to_pool=min_tokens_to_pool, **options)}


def released_preset(geometry: ModelGeometry, **options) -> dict:
    """DPN as its code was released: the paper's schedule, routers reading the mean over the
    ``<ROUTER>`` tokens (one after each human turn), the training guard at 18 kept visual tokens
    (an absolute count, as released) and the global hinge. Needs ``router_token_id``."""
    options = {"routing_loss": "hinge_global", "min_kept_tokens": RELEASED_MIN_KEPT_TOKENS, **options}
    return {**preset(geometry, **options), "router_input": "router_tokens_mean"}


def fitted_preset(geometry: ModelGeometry, fit_flops_weight: float = DEFAULT_FIT_FLOPS_WEIGHT,
                  **options) -> dict:
    """The paper's stages and experts with routers fitted after training (``router_training="fit"``):
    the LLM is fine-tuned on uniformly drawn paths, then each router learns to predict, per expert,
    the training samples' LM loss + ``fit_flops_weight`` x FLOPs ratio, and picks the least. Pooled
    tokens keep their window's position and are not scaled; the routers' temperature is 1."""
    options = {"router_training": "fit", "probability_scale": "none", "routing_loss": "none",
               "router_temperature": FITTED_TEMPERATURE, "fit_flops_weight": fit_flops_weight, **options}
    return {**preset(geometry, **options), "positions": "keep"}


def fit_weight_spec(name: str, preset: Callable[..., dict]) -> SpecBuilder:
    """The builder of spec ``name[:W]`` for a preset with fitted routers: ``preset(geometry)``, with
    ``fit_flops_weight=W`` when given."""
    def build(geometry: ModelGeometry, argument: str | None) -> dict:
        if not argument:
            return preset(geometry)
        try:
            weight = float(argument)
        except ValueError:
            raise ValueError(f"pyramid spec '{name}:{argument}': the FLOPs weight must be a number, e.g. {name}:0.2") \
                from None
        return preset(geometry, fit_flops_weight=weight)
    return build


def _budget_preset(geometry: ModelGeometry, budget_target: float | None = None) -> dict:
    if budget_target is None:
        raise ValueError("pyramid spec 'budget' needs a FLOPs fraction: budget:0.5")
    return preset(geometry, routing_loss="budget", budget_target=budget_target)


register_strategy("dpn", DPNConfig, DynamicPyramid)
register_spec("paper", plain_spec("paper", preset), "paper (= dpn)")
register_spec("dpn", plain_spec("dpn", preset), "dpn", plot_style="C3o-")
register_spec("released", plain_spec("released", released_preset),
              "released (DPN as its code was released: <ROUTER> tokens, guard, global hinge)")
register_spec("fitted", fit_weight_spec("fitted", fitted_preset), "fitted[:W] (DPN with routers fitted to per-path losses; W: FLOPs weight, "
              f"default {DEFAULT_FIT_FLOPS_WEIGHT})")
register_spec("budget", fraction_spec("budget", _budget_preset, "budget_target"),
              "budget:F (DPN trained toward F x vanilla FLOPs)")
