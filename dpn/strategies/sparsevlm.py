"""SparseVLM: text-guided visual token sparsification inside the LLM (Zhang et al., "SparseVLM:
Visual Token Sparsification for Efficient Vision-Language Model Inference", ICML 2025, arXiv
2410.04417). Training-free; the released code's default version (v1.5).

- **Raters.** Once, on the first layer's input: the text after the (last) image up to the query is
  scored by how much attention the visual tokens would pay it (a softmax over the text of raw dot
  products, averaged over the visual tokens); the text tokens scoring above their mean rate.
- **Pruning** after layers 2, 6 and 15 of a 32-layer LLM (the same depths, scaled, elsewhere): each
  visual token's relevance is the attention the raters pay it in that layer (heads and raters
  averaged); each image keeps its most relevant tokens, a fixed number per stage (the reference's
  schedule for its budget: 192 -> 300, 200, 110 of 576 tokens; the budget is the layer-averaged
  count, not what every layer sees), and always drops at least one.
- **Recycling.** The most relevant 30% (+1) of the dropped tokens are clustered (DPC-KNN: density
  from the k nearest, distance to the nearest denser token, the top density x distance are centres,
  every token joins its nearest centre) into one cluster per ten (+1); each cluster's mean hidden
  state is kept after the image's kept tokens.
Positions are renumbered, as in the reference.

Differences from the reference code (Gumpest/SparseVLMs, ``LlamaDynamicvitModel.forward``,
``score.py``, ``utils.cluster_and_merge``): batches of any size and several images per sample (the
reference is batch size 1 with one image; here every image keeps its own schedule and the raters
read the text after a sample's last image); the rater rows' attention is recomputed for the stage
layer alone (the reference materialises every layer's attention); no random noise breaks density
ties (ties go to the earlier token); a recycled token stands at its cluster centre's position in
``keep`` mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpn.attention import query_attention
from dpn.geometry import ModelGeometry
from dpn.strategies.base import (
    InputLayout, StageInput, TokenPath, check_choice, register_spec, register_strategy,
)
from dpn.strategies.selection import ImageByImage, SelectionConfig, SelectionStage, kept_count

# The reference's pruning layers for a 32-layer LLM (LLaVA-1.5-7B), scaled to other depths.
REFERENCE_LAYERS = (2, 6, 15)
REFERENCE_DEPTH = 32
REFERENCE_IMAGE_TOKENS = 576
# The reference's v1.5 schedule: tokens each stage keeps of LLaVA-1.5's 576, per budget (RETAIN_TOKN).
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
DEFAULT_BUDGET = 192
# Recycling: the share of dropped tokens (by relevance) clustered, and dropped candidates per cluster.
RECYCLED_SHARE = 0.3
CANDIDATES_PER_CLUSTER = 10


@dataclass
class SparseVLMConfig(SelectionConfig):
    """Stages at the reference's depths; each stage's ``keep_ratio`` is a share of the image's
    *original* tokens (the reference's schedule divided by 576). ``recycle``: cluster and keep the
    most relevant dropped tokens (the reference's v1.5 default)."""

    name = "sparsevlm"
    recycle: bool = True

    def __post_init__(self) -> None:
        check_choice("recycle", self.recycle, (True, False))

    def token_paths(self, stages: list[SelectionStage], grids) -> list[TokenPath]:
        shapes = [list(grids)]
        for stage in stages:
            shapes.append([(1, tokens_after(rows * cols, kept_count(original_rows * original_cols, stage.keep_ratio),
                                            self.recycle))
                           for (rows, cols), (original_rows, original_cols) in zip(shapes[-1], grids)])
        return [TokenPath([f"keep {s.keep_ratio:g}" for s in stages], shapes)]


def tokens_after(tokens: int, target: int, recycle: bool) -> int:
    """Visual tokens an image of ``tokens`` has after a stage that keeps ``target`` (at most all but one)."""
    kept = min(target, tokens - 1)
    return kept + recycled_count(tokens - kept) if recycle else kept


def recycled_count(dropped: int) -> int:
    """Clusters the reference makes of ``dropped`` tokens (0 for none)."""
    return 0 if dropped <= 0 else int(candidate_count(dropped) / CANDIDATES_PER_CLUSTER) + 1


def candidate_count(dropped: int) -> int:
    return int(dropped * RECYCLED_SHARE) + 1


class TextRatedSelection(ImageByImage):
    """Keeps each image's tokens the text raters attend to most, recycling some of the rest."""

    options: SparseVLMConfig
    reads_query = True

    def stage_context(self, stage: int, inputs: StageInput) -> torch.Tensor:
        """(batch * length,) each token's relevance: the raters' attention to it in the stage layer."""
        if inputs.layer is None or inputs.first_input is None:
            raise ValueError("sparsevlm ranks tokens with a decoder layer's attention; its stages sit after a layer")
        raters, real = rater_positions(inputs.first_input, inputs.spans, inputs.query_index)
        return query_attention(inputs.layer, inputs.layer_input, inputs.position_embeddings, raters, inputs.valid,
                               real).flatten()

    def image_tokens(self, stage: int, inputs: StageInput, relevance: torch.Tensor, k: int,
                     image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = kept_count(inputs.first_input.spans.size(k), self.config.stages[stage].keep_ratio)
        kept = min(target, image.shape[0] - 1)
        order = relevance[image].argsort(descending=True, stable=True)
        chosen = image[order[:kept].sort().values]
        if not self.strategy_config.recycle:
            return inputs.rows_at(chosen), chosen
        candidates = image[order[kept:][: candidate_count(image.shape[0] - kept)]]  # the most relevant dropped
        merged, centres = cluster_and_merge(inputs.rows_at(candidates), recycled_count(image.shape[0] - kept))
        return torch.cat([inputs.rows_at(chosen), merged]), torch.cat([chosen, candidates[centres]])


def rater_positions(first: InputLayout, spans, query_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, R) positions, in the current layout, of each sample's text raters and which are real.

    Raters are chosen on the first layer's input: the text after the sample's last image up to its
    query, scored by the visual tokens' mean softmax (over that text) of raw dot products; those above
    the mean rate. The text is never pruned, so each rater keeps its offset from the last image's end.
    A sample with no text after its images rates with its query token."""
    batch, seq_len, width = first.hidden.shape
    first_queries, queries = first.query_index.tolist(), query_index.tolist()
    first_ends, ends = _last_image_ends(first.spans, batch), _last_image_ends(spans, batch)
    flat = first.hidden.reshape(batch * seq_len, width)
    chosen: list[list[int]] = []
    for b in range(batch):
        if first_ends[b] is None or queries[b] < 0:
            chosen.append([max(queries[b], 0)])
            continue
        text = torch.arange(first_ends[b], first_queries[b] + 1, device=first.hidden.device)
        if text.numel() == 0:
            chosen.append([queries[b]])
            continue
        images = [k for k in range(len(first.spans)) if first.spans.sample[k] == b]
        visual = flat[first.spans.token_index(images, seq_len, first.hidden.device)].float()
        scores = torch.softmax(visual @ flat[b * seq_len + text].float().T, dim=-1).mean(0)
        offsets = (scores > scores.mean()).nonzero().squeeze(1).tolist()
        chosen.append([ends[b] + offset for offset in offsets] or [queries[b]])
    width_r = max(len(c) for c in chosen)
    positions = torch.tensor([c + [c[0]] * (width_r - len(c)) for c in chosen], device=first.hidden.device)
    real = torch.tensor([[True] * len(c) + [False] * (width_r - len(c)) for c in chosen], device=first.hidden.device)
    return positions, real


def _last_image_ends(spans, batch: int) -> list[int | None]:
    """Per sample, the position after its last visual span (None without images)."""
    ends: list[int | None] = [None] * batch
    for k in range(len(spans)):
        end = spans.start[k] + spans.extent(k)
        b = spans.sample[k]
        ends[b] = end if ends[b] is None else max(ends[b], end)
    return ends


def cluster_and_merge(tokens: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN: (clusters, d) the mean of each cluster's tokens, and each cluster's centre (index
    into ``tokens``), centres in descending density x distance."""
    count, width = tokens.shape
    clusters = min(clusters, count)
    distance = torch.cdist(tokens.float(), tokens.float()) / width ** 0.5
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(-1)).exp()
    # Ties go to the earlier token (the reference adds noise): a later token counts as denser only if strictly so.
    order = torch.arange(count, device=tokens.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (order[None, :] < order[:, None]))
    parent_distance = torch.where(denser.any(-1), distance.masked_fill(~denser, float("inf")).min(-1).values,
                                  distance.max())
    centres = (parent_distance * density).topk(clusters).indices
    assignment = distance[centres].argmin(0)  # each token's nearest centre
    assignment[centres] = torch.arange(clusters, device=tokens.device)  # a centre joins itself
    members = torch.nn.functional.one_hot(assignment, clusters).to(tokens.dtype)  # (count, clusters)
    merged = members.T @ tokens / members.sum(0).unsqueeze(1)
    return merged, centres


def preset(geometry: ModelGeometry, budget: int = DEFAULT_BUDGET, **options) -> dict:
    """SparseVLM at the reference's depths (scaled to the model's), with the reference's schedule for
    ``budget`` (192, 128, 96 or 64 layer-averaged tokens of LLaVA-1.5's 576), positions renumbered."""
    if budget not in SCHEDULES:
        raise ValueError(f"sparsevlm's budgets are the reference's schedules {sorted(SCHEDULES)}; got {budget!r}")
    layers = stage_layers(geometry.num_layers)
    stages = [SelectionStage(layer, keep_ratio=tokens / REFERENCE_IMAGE_TOKENS)
              for layer, tokens in zip(layers, SCHEDULES[budget])]
    positions = "renumber" if "renumber" in geometry.position_modes else geometry.position_modes[0]  # M-RoPE: keep
    return {"stages": stages, "strategy": SparseVLMConfig(**options), "positions": positions}


def stage_layers(num_layers: int) -> list[int]:
    """The reference's pruning layers scaled to a ``num_layers`` LLM (distinct, leaving a layer after)."""
    layers = sorted({min(round(layer * num_layers / REFERENCE_DEPTH), num_layers - 2) for layer in REFERENCE_LAYERS})
    if num_layers < 2:
        raise ValueError(f"a {num_layers}-layer model is too shallow for sparsevlm")
    return layers


def parse_spec(geometry: ModelGeometry, value: str | None) -> dict:
    if not value:
        return preset(geometry)
    if not value.isdigit() or int(value) not in SCHEDULES:
        raise ValueError(f"pyramid spec 'sparsevlm:{value}': the budget is one of the reference's "
                         f"{sorted(SCHEDULES)} (layer-averaged tokens of 576)")
    return preset(geometry, budget=int(value))


register_strategy("sparsevlm", SparseVLMConfig, TextRatedSelection)
register_spec("sparsevlm", parse_spec, "sparsevlm[:192|:128|:96|:64]", plot_style="C7>-")
