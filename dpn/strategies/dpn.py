"""Dynamic Pooling Experts: the routers of a Dynamic Pyramid Network (arXiv 2503.20322, sec. 3).

At each stage a small router reads one hidden state per sample (the last prompt token, or a
dedicated router token) and picks a pooling stride ("expert") for that sample's images. The
pooled tokens are multiplied by the chosen expert's probability, which is the router's gradient
path. A hinge "routing loss" pushes the routers toward confident, strong compression; the LM loss
pushes back on samples that need detail. Instead of the hinge, a "budget" loss pulls the expected
LLM FLOPs toward a target fraction; at inference ``router_bias`` trades accuracy for FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpn.config import PyramidConfig
from dpn.flops import decoder_flops, segment_layer_tokens
from dpn.strategies.base import StagePlan
from dpn.strategies.pooling import GridPooling
from dpn.transfer import host_tensor


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


@dataclass
class BudgetInputs:
    """Per-sample token counts of a prefill, for the ``budget`` routing loss."""

    text_config: Any
    num_layers: int
    text_tokens: torch.Tensor  # (batch,)
    visual_tokens: torch.Tensor  # (batch,) before the first stage


class DynamicPyramid(GridPooling):
    """The per-stage routers of a pyramid and the pooling they drive. Holds no per-call state."""

    reads_query = True

    def __init__(self, config: PyramidConfig, hidden_size: int) -> None:
        super().__init__(config)
        self.routers = nn.ModuleList(
            Router(hidden_size, len(stage.experts), config.router_reduction) for stage in config.stages
        )

    def token_scale(self, probability: torch.Tensor) -> torch.Tensor | None:
        """p (the paper), p / stop_gradient(p) (``straight_through``: values unscaled, same gradient),
        or None: scaling off, or ``train_only`` at inference."""
        mode = self.config.probability_scale
        if not self.config.scale_by_probability or (mode == "train_only" and not self.training):
            return None
        return probability / probability.detach() if mode == "straight_through" else probability

    def route(self, stage: int, router_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities (n, E) in fp32 and the chosen expert per row (n,).

        ``router_bias`` shifts the log-probabilities by bias x expert scale before the choice,
        moving the pyramid along its accuracy / FLOPs curve without retraining.
        """
        logits = self.routers[stage](router_hidden).float() / self.config.router_temperature
        if self.config.router_bias:
            scales = host_tensor(self.config.scales(stage), logits.device, logits.dtype)
            logits = torch.log_softmax(logits, dim=-1) + self.config.router_bias * scales
        probs = torch.softmax(logits, dim=-1)
        if self.training and self.config.sample_in_training:
            choice = torch.multinomial(probs.detach(), 1).squeeze(-1)
        else:
            choice = probs.argmax(-1)
        return probs, choice

    def choose(self, stage, inputs, samples):
        return self.route(stage, inputs.hidden[samples, inputs.query_index[samples]])

    def routing_loss(self, plans: list[StagePlan], budget: BudgetInputs | None = None) -> torch.Tensor | None:
        if self.config.routing_loss == "hinge":
            return self.hinge_loss([p.router_probs[p.routed] for p in plans])
        if self.config.routing_loss == "budget":
            if budget is None:
                raise ValueError("the budget routing loss needs the batch's token counts")
            return self.budget_loss(plans, budget)
        return None

    def hinge_loss(self, stage_probs: list[torch.Tensor]) -> torch.Tensor | None:
        """The paper's hinge: mean over stages of max(0, target - mean_b s[argmax p_b] * max p_b).

        ``stage_probs`` holds, per stage, the router probabilities of the samples routed there.
        """
        terms = []
        for stage, probs in enumerate(stage_probs):
            if probs is None or probs.shape[0] == 0:
                continue
            scales = host_tensor(self.config.scales(stage), probs.device, probs.dtype)
            confidence, expert = probs.max(dim=-1)
            terms.append(F.relu(self.config.routing_loss_target - (scales[expert] * confidence).mean()))
        if not terms:
            return None
        return torch.stack(terms).mean()

    def budget_loss(self, plans: list[StagePlan], budget: BudgetInputs) -> torch.Tensor | None:
        """(mean over samples with images of the expected LLM FLOPs ratio - budget_target) squared.

        The expectation is over the router's probabilities, stage by stage: an expert (kh, kw)
        divides the visual tokens by kh * kw. Samples share one budget, so a hard sample may keep
        more tokens when easy ones keep fewer. Per-layer attention uses the expected count too.
        """
        with_images = budget.visual_tokens > 0
        if not bool(with_images.any()):
            return None
        visual = budget.visual_tokens.float()
        segment_tokens = [budget.text_tokens.float() + visual]
        for stage, plan in enumerate(plans):
            shrink = host_tensor([1.0 / (kh * kw) for kh, kw in self.config.stages[stage].experts],
                                 visual.device, torch.float32)
            factor = torch.where(plan.routed, (plan.router_probs * shrink).sum(-1), torch.ones_like(visual))
            visual = visual * factor
            segment_tokens.append(budget.text_tokens.float() + visual)
        layer_tokens = torch.stack(segment_layer_tokens(budget.num_layers, self.stage_layers, segment_tokens), dim=1)
        expected = decoder_flops(budget.text_config, layer_tokens)
        vanilla = decoder_flops(budget.text_config, segment_tokens[0][:, None].expand_as(layer_tokens))
        ratio = (expected / vanilla)[with_images]
        return (ratio.mean() - self.config.budget_target) ** 2
