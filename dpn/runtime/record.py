"""The per-sample record of a prefill: routing, visual tokens per stage, tokens per layer, FLOPs."""

from __future__ import annotations

import torch

from dpn.flops import decoder_flops
from dpn.outputs import PyramidRouting
from dpn.transfer import host_tensor


def routing_record(text_config, strategy, plans, visual_counts, segment_queries, segment_keys, bounds):
    """Per-sample record of a prefill; ``plans`` is empty when the batch had no images."""
    batch, device = segment_queries[0].shape[0], segment_queries[0].device
    stages = len(strategy.config.stages)

    def per_layer(per_segment: list[torch.Tensor]) -> torch.Tensor:
        columns = [tokens for tokens, (first, end) in zip(per_segment, bounds) for _ in range(first, end)]
        return torch.stack(columns, dim=1)

    layer_tokens = per_layer(segment_queries)
    layer_keys = per_layer(segment_keys)
    num_layers = layer_tokens.shape[1]
    vanilla_tokens = segment_queries[0][:, None].expand(-1, num_layers)
    vanilla_keys = segment_keys[0][:, None].expand(-1, num_layers)
    if plans:
        experts = torch.stack([p.experts for p in plans], dim=1)
        probability = torch.stack([p.expert_probability for p in plans], dim=1).detach()
        router_probs = [p.router_probs.detach() for p in plans]
    else:
        experts = torch.full((batch, stages), -1, dtype=torch.long, device=device)
        probability = torch.zeros(batch, stages, device=device)
        router_probs = [torch.zeros(batch, strategy.num_choices(s), device=device) for s in range(stages)]
        visual_counts = visual_counts * (stages + 1)
    return PyramidRouting(
        experts=experts,
        expert_probability=probability,
        router_probs=router_probs,
        visual_tokens=host_tensor(visual_counts, device).T,
        layer_tokens=layer_tokens,
        flops=decoder_flops(text_config, layer_tokens, layer_keys),
        vanilla_flops=decoder_flops(text_config, vanilla_tokens, vanilla_keys),
    )
