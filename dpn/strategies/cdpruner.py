"""CDPruner: conditional-diversity token pruning (Zhang et al., "Beyond Attention or Similarity:
Maximizing Conditional Diversity for Token Pruning in MLLMs", arXiv 2506.10967, NeurIPS 2025).
Training-free.

Before the first decoder layer, each image keeps the subset of its visual tokens (as the LLM
receives them: after the projector) that a determinantal point process finds most diverse
*conditioned on the instruction*: with ``S`` the cosine similarities of the image's tokens and ``r``
each token's relevance to the instruction (its mean cosine to the instruction's vectors, min-max
scaled over the image), the kernel is ``diag(r) S diag(r)``, and the fast greedy MAP of Chen et al.
(NeurIPS 2018) picks tokens one at a time, each the one adding most to the log-determinant of the
kept set. Kept tokens stay in their order and, as in the reference, get renumbered positions.

Differences from the reference code (Theia-4869/CDPruner @ 9541616; docs/fidelity.md):
- The instruction's vectors are the LLM's input embeddings of the prompt's text after the sample's
  last image up to its query token, compared with the projected visual rows (the same space), and
  the relevance is not negated. The reference, released for CLIP-based LLaVA only, compares CLIP's
  pooled text embedding of the raw question with the vision tower's patches through CLIP's own
  projection, and negates that cosine; a LLaVA checkpoint carries neither CLIP's text tower nor its
  visual projection. ``negate_relevance=True`` gives the reference's sign.
- Batched; every image of every sample on its own (the reference: batch size 1, LLaVA-NeXT's views
  min-max scaled together and every row newline kept on top of the budget); float32 throughout; a
  step whose remaining gain is not positive (the kernel's rank is exhausted) divides by a floor
  instead of producing NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpn.geometry import ModelGeometry
from dpn.strategies.base import BEFORE_FIRST_LAYER, StageInput, check_choice, register_spec, register_strategy
from dpn.strategies.selection import (
    BeforeLLMSelectionConfig, ImageByImage, SelectionStage, kept_count, kept_tokens_spec,
)

# The middle of the paper's LLaVA-1.5 budgets (192 / 128 / 64 of 576 visual tokens).
CDPRUNER_KEEP_RATIO = 128 / 576
# Added to the numerator of the min-max scaling, as the reference does: no token's relevance is 0.
RELEVANCE_FLOOR = 1e-6
# Below this the greedy step's remaining gain is treated as exhausted (the reference would divide by it).
GAIN_FLOOR = 1e-10


@dataclass
class CDPrunerConfig(BeforeLLMSelectionConfig):
    """One stage at layer -1 (before the LLM) keeping ``keep_ratio`` of each image.

    Attributes:
        negate_relevance: rank by minus the cosine to the instruction, as the reference does with
            CLIP's embeddings (off: the LLM's own embeddings, where alike means relevant).
    """

    name = "cdpruner"
    negate_relevance: bool = False

    def __post_init__(self) -> None:
        check_choice("negate_relevance", self.negate_relevance, (True, False))


class ConditionalDiversitySelection(ImageByImage):
    """Keeps each image's tokens a DPP conditioned on the instruction picks (see the module docstring)."""

    options: CDPrunerConfig
    reads_query = True

    def stage_context(self, stage: int, inputs: StageInput) -> list[torch.Tensor]:
        """Per sample, the unit vectors of its instruction (the embeddings of its text after its last
        image up to its query; the query alone when no text follows the image)."""
        hidden, spans = inputs.hidden, inputs.spans
        ends: dict[int, int] = {}
        for k in range(len(spans)):
            ends[spans.sample[k]] = max(ends.get(spans.sample[k], 0), spans.start[k] + spans.extent(k))
        queries = inputs.query_index.tolist()
        instructions = []
        for b, query in enumerate(queries):
            first = min(ends.get(b, query), query)
            text = hidden[b, first:query + 1][inputs.valid[b, first:query + 1]]
            instructions.append(F.normalize(text.float(), dim=-1))
        return instructions

    def image_tokens(self, stage: int, inputs: StageInput, instructions: list[torch.Tensor], k: int,
                     image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = inputs.rows_at(image)
        unit = F.normalize(rows.float(), dim=-1)
        relevance = instruction_relevance(unit, instructions[inputs.spans.sample[k]],
                                          self.strategy_config.negate_relevance)
        kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
        kept = greedy_dpp(kernel, kept_count(image.shape[0], self.config.stages[stage].keep_ratio))
        return rows[kept], image[kept]


def instruction_relevance(visual: torch.Tensor, instruction: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """(n,) each visual token's mean cosine to the instruction's vectors (``visual`` (n, d) and
    ``instruction`` (m, d) unit rows; negated with ``negate``), min-max scaled over the image to
    (0, 1] (all ones when the tokens tie)."""
    score = (visual @ instruction.T).mean(1)
    if negate:
        score = -score
    spread = score.max() - score.min()
    if spread <= 0:
        return torch.ones_like(score)
    return (score - score.min() + RELEVANCE_FLOOR) / spread


def greedy_dpp(kernel: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (sorted) of ``keep`` items of the PSD ``kernel`` (n, n) chosen by the fast greedy MAP
    of a DPP (Chen et al., NeurIPS 2018): each step takes the item whose conditional gain (the
    factor it multiplies the kept set's determinant by) is largest, the first on ties, and updates
    every item's gain with one Cholesky-like row; exactly ``min(keep, n)`` picks."""
    count = kernel.shape[0]
    keep = min(keep, count)
    kernel = kernel.float()
    gains = kernel.diagonal().clone()
    rows = torch.zeros(keep, count, dtype=kernel.dtype, device=kernel.device)
    chosen = []
    for step in range(keep):
        pick = int(gains.argmax())
        chosen.append(pick)
        row = (kernel[pick] - rows[:step, pick] @ rows[:step]) / gains[pick].clamp(min=GAIN_FLOOR).sqrt()
        rows[step] = row
        gains = gains - row ** 2
        gains[chosen] = -float("inf")
    return torch.tensor(sorted(chosen), dtype=torch.long, device=kernel.device)


def preset(geometry: ModelGeometry, keep_ratio: float = CDPRUNER_KEEP_RATIO, **options) -> dict:
    """CDPruner before the LLM keeping ``keep_ratio`` of each image, positions renumbered (as the
    reference, whose LLM numbers what it keeps consecutively; M-RoPE families keep theirs)."""
    positions = "renumber" if "renumber" in geometry.position_modes else geometry.position_modes[0]
    return {"stages": [SelectionStage(BEFORE_FIRST_LAYER, keep_ratio=keep_ratio)],
            "strategy": CDPrunerConfig(**options), "positions": positions}


register_strategy("cdpruner", CDPrunerConfig, ConditionalDiversitySelection)
register_spec("cdpruner", kept_tokens_spec("cdpruner", preset), "cdpruner[:KEEP | :Nt]", plot_style="C9s-")
