"""Attention-ranked token selection: FastV (arXiv 2403.06764) and PyramidDrop (arXiv 2410.17247).

At a stage, each image keeps ``keep_ratio`` of its remaining visual tokens: those that receive
the most attention from the sample's last prompt token at the stage's layer (head-averaged).
FastV is one stage (K = 2, R = 50% by default); PyramidDrop is several, each keeping a ratio
of what is left. Kept tokens stay in their original order; they no longer form a 2D grid, so
an image becomes a single row of tokens. Nothing here is trained (the model may be fine-tuned
with the selection in place).
"""

from __future__ import annotations

import torch

from dpn.attention import query_attention
from dpn.strategies.base import StageInput, StagePlan, Strategy


def kept_count(tokens: int, keep_ratio: float) -> int:
    """Tokens an image of ``tokens`` keeps at ``keep_ratio`` (at least one)."""
    return max(1, round(tokens * keep_ratio))


class AttentionSelection(Strategy):
    reads_query = True

    def plan(self, stage: int, inputs: StageInput) -> StagePlan:
        hidden, spans = inputs.hidden, inputs.spans
        batch, seq_len, width = hidden.shape
        device = hidden.device
        plan = StagePlan.unrouted(batch, 0, device)
        images = list(range(len(spans)))  # the runtime has checked that each has a query token
        if not images:
            return plan
        if inputs.layer is None or inputs.layer_input is None:
            raise ValueError(f"{self.config.strategy} ranks tokens with a decoder layer's attention; "
                             "its stages must sit after a layer (layer >= 0)")
        scores = query_attention(
            inputs.layer, inputs.layer_input, inputs.position_embeddings, inputs.query_index.clamp(min=0), inputs.valid
        ).flatten()
        keep_ratio = self.config.stages[stage].keep_ratio
        groups: dict[int, list[int]] = {}
        for k in images:
            groups.setdefault(spans.size(k), []).append(k)
        flat = hidden.reshape(batch * seq_len, width)
        rows, representatives = [], []
        for size, members in groups.items():
            index = spans.token_index(members, seq_len, device).view(len(members), size)
            keep = kept_count(size, keep_ratio)
            top = scores[index].topk(keep, dim=1).indices.sort(dim=1).values
            chosen = index.gather(1, top).flatten()
            rows.append(flat[chosen])
            representatives.append(chosen)
            plan.spans.extend(members)
            plan.grids.extend([(1, keep)] * len(members))
        plan.rows = torch.cat(rows)
        plan.representatives = torch.cat(representatives)
        return plan
