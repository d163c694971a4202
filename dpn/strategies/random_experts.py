"""Random routing: DPN's stages and experts, each sample's expert drawn uniformly (the paper's
random-routing ablation, arXiv 2503.20322, table 4). Seed with ``torch.manual_seed``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpn.geometry import ModelGeometry
from dpn.strategies.base import plain_spec, register_spec, register_strategy
from dpn.strategies.pooling import PAPER_MIN_TOKENS, GridPooling, PoolingConfig, paper_pooling_stages


@dataclass
class RandomConfig(PoolingConfig):
    name = "random"


class RandomPooling(GridPooling):
    def choose(self, stage, inputs, samples):
        num_experts = len(self.config.stages[stage].experts)
        probs = torch.full((samples.shape[0], num_experts), 1.0 / num_experts, device=samples.device)
        choice = torch.randint(0, num_experts, (samples.shape[0],), device=samples.device)
        return probs, choice


def preset(geometry: ModelGeometry, min_tokens_to_pool: int = PAPER_MIN_TOKENS, **options) -> dict:
    return {"stages": paper_pooling_stages(geometry, min_tokens_to_pool),
            "strategy": RandomConfig(min_tokens_to_pool=min_tokens_to_pool, **options)}


register_strategy("random", RandomConfig, RandomPooling)
register_spec("random", plain_spec("random", preset), "random", plot_style="C7x")
