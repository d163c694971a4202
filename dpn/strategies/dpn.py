"""Dynamic Pooling Experts: the routers of a Dynamic Pyramid Network (arXiv 2503.20322, sec. 3).

At each stage a small router reads one hidden state per sample (the last prompt token, or a
dedicated router token) and picks a pooling stride ("expert") for that sample's images. The
pooled tokens are multiplied by the chosen expert's probability, which is the router's gradient
path. A hinge "routing loss" pushes the routers toward confident, strong compression; the LM loss
pushes back on samples that need detail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpn.config import PyramidConfig
from dpn.spans import VisualSpans, pool_grid, window_origins
from dpn.strategies.base import StagePlan


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


class DynamicPyramid(nn.Module):
    """The per-stage routers of a pyramid and the pooling they drive. Holds no per-call state."""

    def __init__(self, config: PyramidConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.routers = nn.ModuleList(
            Router(hidden_size, len(stage.experts), config.router_reduction) for stage in config.stages
        )

    @property
    def stage_layers(self) -> list[int]:
        return [stage.layer for stage in self.config.stages]

    def route(
        self, stage: int, router_hidden: torch.Tensor, forced: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities (n, E) in fp32 and the chosen expert per row (n,)."""
        logits = self.routers[stage](router_hidden).float()
        probs = torch.softmax(logits / self.config.router_temperature, dim=-1)
        if self.training and self.config.sample_in_training:
            choice = torch.multinomial(probs.detach(), 1).squeeze(-1)
        else:
            choice = probs.argmax(-1)
        if forced is not None:
            choice = torch.where(forced >= 0, forced, choice)
        return probs, choice

    def plan(
        self,
        stage: int,
        hidden: torch.Tensor,
        spans: VisualSpans,
        router_index: torch.Tensor,
        forced: torch.Tensor | None,
    ) -> StagePlan:
        """Route every sample with a poolable image and pool its images with the chosen expert."""
        batch, seq_len, width = hidden.shape
        device = hidden.device
        experts = self.config.stages[stage].experts
        min_tokens = self.config.min_tokens_to_pool
        eligible = [k for k in range(len(spans)) if spans.size(k) >= min_tokens]
        plan = StagePlan(
            experts=torch.full((batch,), -1, dtype=torch.long, device=device),
            expert_probability=torch.zeros(batch, device=device),
            router_probs=torch.zeros(batch, len(experts), device=device),
            routed=torch.zeros(batch, dtype=torch.bool, device=device),
        )
        if not eligible:
            return plan
        samples = sorted({spans.sample[k] for k in eligible})
        routed = torch.tensor(samples, device=device)
        if bool((router_index[routed] < 0).any()):
            raise ValueError("a sample with an image has no router token; add the router token to its prompt")
        router_hidden = hidden[routed, router_index[routed]]
        sample_forced = None if forced is None else forced[routed]
        probs, choice = self.route(stage, router_hidden, sample_forced)
        chosen_probability = probs.gather(1, choice[:, None]).squeeze(1)
        plan.experts = plan.experts.index_copy(0, routed, choice)
        plan.expert_probability = plan.expert_probability.index_copy(0, routed, chosen_probability)
        plan.router_probs = plan.router_probs.index_copy(0, routed, probs)
        plan.routed = plan.routed.index_fill(0, routed, True)

        scale = plan.expert_probability if self.config.scale_by_probability else None
        choice_of_sample = dict(zip(samples, choice.tolist()))
        groups: dict[tuple[int, int, int, int], list[int]] = {}
        for k in eligible:
            kernel = experts[choice_of_sample[spans.sample[k]]]
            groups.setdefault((spans.rows[k], spans.cols[k], *kernel), []).append(k)

        flat = hidden.reshape(batch * seq_len, width)
        rows, representatives = [], []
        for (n_rows, n_cols, kh, kw), members in groups.items():
            index = spans.token_index(members, seq_len, device).view(len(members), n_rows * n_cols)
            tokens = flat[index].view(len(members), n_rows, n_cols, width)
            pooled = pool_grid(tokens, (kh, kw), self.config.pooling).reshape(len(members), -1, width)
            if scale is not None:
                member_samples = torch.tensor([spans.sample[k] for k in members], device=device)
                pooled = pooled * scale[member_samples].to(pooled.dtype)[:, None, None]
            rows.append(pooled.reshape(-1, width))
            origins = window_origins(n_rows, n_cols, (kh, kw), device)
            representatives.append((index[:, :1] + origins[None, :]).flatten())
            plan.spans.extend(members)
            plan.grids.extend([(n_rows // kh, n_cols // kw)] * len(members))
        plan.rows = torch.cat(rows)
        plan.representatives = torch.cat(representatives)
        return plan

    def routing_loss(self, stage_probs: list[torch.Tensor]) -> torch.Tensor | None:
        """The paper's hinge: mean over stages of max(0, target - mean_b s[argmax p_b] * max p_b).

        ``stage_probs`` holds, per stage, the router probabilities of the samples routed there.
        """
        if self.config.routing_loss == "none":
            return None
        terms = []
        for stage, probs in enumerate(stage_probs):
            if probs is None or probs.shape[0] == 0:
                continue
            scales = torch.tensor(self.config.scales(stage), device=probs.device, dtype=probs.dtype)
            confidence, expert = probs.max(dim=-1)
            terms.append(F.relu(self.config.routing_loss_target - (scales[expert] * confidence).mean()))
        if not terms:
            return None
        return torch.stack(terms).mean()
