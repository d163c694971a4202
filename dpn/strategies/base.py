"""What a compression strategy hands the runtime at each stage.

A strategy looks at the hidden states after a stage's layer and says, for some images, which new
tokens replace them. The runtime does the rest: it rebuilds the shorter sequences, their masks,
positions, labels and cache bookkeeping. A strategy never touches the layout itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StagePlan:
    """New tokens for some images, in the order of ``spans``.

    Attributes:
        spans: indices (into the current ``VisualSpans``) of the images being replaced.
        rows: the replacement tokens of all those images, concatenated, shape (P, d).
        representatives: for each replacement token, the flat index (sample * seq_len + position) of
            the original token it stands for; its position (``keep`` mode) and label come from there.
        grids: the (rows, cols) grid of each replaced image after this stage.
        experts: (batch,) chosen expert per sample, -1 where the sample was not routed.
        expert_probability: (batch,) probability of the chosen expert (0 where not routed).
        router_probs: (batch, num_experts) router probabilities (zeros where not routed).
        routed: (batch,) bool, samples the router decided for.
    """

    spans: list[int] = field(default_factory=list)
    rows: torch.Tensor | None = None
    representatives: torch.Tensor | None = None
    grids: list[tuple[int, int]] = field(default_factory=list)
    experts: torch.Tensor | None = None
    expert_probability: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None
    routed: torch.Tensor | None = None
