"""Grid pooling strategies: each stage pools every image on its 2D grid with a stride per sample.

``GridPooling`` does the pooling; subclasses only choose the stride ("expert") of each sample:

- ``StaticPooling``: the stage's one fixed stride (DPN's static ablation, and projector-side
  compression when the stage sits before the first decoder layer);
- ``RandomPooling``: a stride drawn uniformly per sample and stage (DPN's random ablation);
- ``dpn.strategies.dpn.DynamicPyramid``: learned routers (the paper's method).
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from dpn.spans import pool_grid, window_origins
from dpn.strategies.base import StageInput, StagePlan, Strategy
from dpn.transfer import host_tensor


class GridPooling(Strategy):
    @abstractmethod
    def choose(self, stage: int, inputs: StageInput, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert probabilities (n, E) in fp32 and the chosen expert (n,) for the rows ``samples``."""

    def plan(self, stage: int, inputs: StageInput) -> StagePlan:
        """Choose an expert for every sample with a poolable image and pool its images with it."""
        hidden, spans = inputs.hidden, inputs.spans
        batch, seq_len, width = hidden.shape
        device = hidden.device
        experts = self.config.stages[stage].experts
        eligible = [k for k in range(len(spans)) if spans.size(k) >= self.config.min_tokens_to_pool]
        plan = StagePlan.unrouted(batch, len(experts), device)
        if not eligible:
            return plan
        samples = sorted({spans.sample[k] for k in eligible})
        routed = host_tensor(samples, device)
        probs, choice = self.choose(stage, inputs, routed)
        if inputs.forced is not None:
            choice = torch.where(inputs.forced[routed] >= 0, inputs.forced[routed], choice)
        chosen_probability = probs.gather(1, choice[:, None]).squeeze(1)
        plan.experts = plan.experts.index_copy(0, routed, choice)
        plan.expert_probability = plan.expert_probability.index_copy(0, routed, chosen_probability)
        plan.router_probs = plan.router_probs.index_copy(0, routed, probs)
        plan.routed = plan.routed.index_fill(0, routed, True)

        scale = self.token_scale(plan.expert_probability)
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
                member_samples = host_tensor([spans.sample[k] for k in members], device)
                pooled = pooled * scale[member_samples].to(pooled.dtype)[:, None, None]
            rows.append(pooled.reshape(-1, width))
            origins = window_origins(n_rows, n_cols, (kh, kw), device)
            representatives.append((index[:, :1] + origins[None, :]).flatten())
            plan.spans.extend(members)
            plan.grids.extend([(n_rows // kh, n_cols // kw)] * len(members))
        plan.rows = torch.cat(rows)
        plan.representatives = torch.cat(representatives)
        return plan

    def token_scale(self, probability: torch.Tensor) -> torch.Tensor | None:
        """Per-sample factor for the pooled tokens given the chosen experts' probabilities (the
        routers' gradient path), or None to leave them unscaled (no router to train)."""
        return None


class StaticPooling(GridPooling):
    """One fixed stride per stage: the ``static`` and ``projector`` strategies."""

    def choose(self, stage, inputs, samples):
        probs = torch.ones(samples.shape[0], 1, device=samples.device)
        return probs, torch.zeros(samples.shape[0], dtype=torch.long, device=samples.device)


class RandomPooling(GridPooling):
    """Each sample's stride drawn uniformly from the stage's experts (seed with ``torch.manual_seed``)."""

    def choose(self, stage, inputs, samples):
        num_experts = len(self.config.stages[stage].experts)
        probs = torch.full((samples.shape[0], num_experts), 1.0 / num_experts, device=samples.device)
        choice = torch.randint(0, num_experts, (samples.shape[0],), device=samples.device)
        return probs, choice
