"""The batch layout between stages, and ``shrink``: replacing planned grids with their new tokens.

A ``BatchLayout`` is the state the decoder loop carries: hidden states, which tokens are real, their
positions and labels, where the visual grids sit and where each sample's query token is. After a
stage, ``shrink`` rebuilds every sample in order (text, new visual tokens, text) without padding
and left-pads the batch again; labels and positions travel with their tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

from dpn.supervision import IGNORE_INDEX
from dpn.spans import VisualSpans, ranks_within
from dpn.strategies.base import StagePlan
from dpn.transfer import host_tensor


@dataclass
class BatchLayout:
    """The tokens of one forward call, in the current (possibly shortened) layout."""

    hidden: torch.Tensor  # (batch, length, d)
    valid: torch.Tensor  # (batch, length) bool: real token, not padding
    positions: torch.Tensor  # rotary positions, before the cache's per-segment shift (the adapter's policy's shape)
    labels: torch.Tensor | None  # (batch, length)
    spans: VisualSpans
    query_index: torch.Tensor  # (batch,) position the router reads, -1 for none
    router_tokens: torch.Tensor | None = None  # (batch, length) bool: router tokens whose mean the routers read
    lengths: list[int] | None = None  # real tokens per sample, on the host (known once a stage has shrunk the batch)


def shrink(layout: BatchLayout, plan: StagePlan, position_mode: str, policy) -> tuple[BatchLayout, bool]:
    """Replace the planned images with their new tokens; returns the new layout and whether it shrank.

    When no image changes size (every chosen stride is 1x1) the tokens are replaced in place and
    the layout is kept. Otherwise every sample is rebuilt in order (text, new visual tokens, text),
    padding dropped, and the batch left-padded to its longest sample, so the last column holds
    every sample's last token (as ``generate`` expects). ``policy`` (the adapter's position policy)
    gives the new tokens their positions in ``position_mode``.
    """
    if not plan.spans:
        return layout, False
    batch, length, width = layout.hidden.shape
    device = layout.hidden.device
    spans = layout.spans
    flat = layout.hidden.reshape(batch * length, width)
    rows = plan.rows.to(flat.dtype)
    if all(spans.size(k) == r * c for k, (r, c) in zip(plan.spans, plan.grids)):
        index = plan.token_index if plan.token_index is not None else spans.token_index(plan.spans, length, device)
        hidden = flat.index_copy(0, index, rows).view(batch, length, width)
        return replace(layout, hidden=hidden), False
    rows, representatives, new_sizes = with_newlines(plan, spans, flat, rows, length)
    old_index = spans.extent_index(plan.spans, length, device)  # a replaced grid's newlines go with it

    # Order every surviving token by (sample, position, rank inside a replaced image): a replaced
    # image's tokens sort where the image started, since its original tokens are gone.
    stride = length + 1
    removed = torch.zeros(batch * length, dtype=torch.bool, device=device).index_fill(0, old_index, True)
    kept = (layout.valid.flatten() & ~removed).nonzero().squeeze(1)
    sizes = host_tensor(new_sizes, device)
    span_sample = host_tensor([spans.sample[k] for k in plan.spans], device)
    span_start = host_tensor([spans.start[k] for k in plan.spans], device)
    total = sum(new_sizes)
    row_sample = torch.repeat_interleave(span_sample, sizes, output_size=total)
    row_start = torch.repeat_interleave(span_start, sizes, output_size=total)
    row_key = (row_sample * stride + row_start) * stride + ranks_within(sizes, total)
    kept_sample = kept // length
    keys = torch.cat([(kept_sample * stride + kept % length) * stride, row_key])
    source = torch.cat([kept, batch * length + torch.arange(rows.shape[0], device=device)])
    owner = torch.cat([kept_sample, row_sample])
    order = torch.argsort(keys)
    source, owner = source[order], owner[order]

    counts = torch.zeros(batch, dtype=torch.long, device=device).index_add_(0, owner, torch.ones_like(owner))
    offsets = torch.cumsum(counts, 0) - counts
    rank = torch.arange(owner.shape[0], device=device) - offsets[owner]  # rank inside its sample
    padding_row = batch * length + rows.shape[0]
    slot = torch.full((padding_row,), -1, dtype=torch.long, device=device)  # source -> place in the sorted order
    slot[source] = torch.arange(owner.shape[0], device=device)

    first_rows = itertools.accumulate(new_sizes[:-1], initial=0)
    replaced = dict(zip(plan.spans, zip(first_rows, plan.grids)))
    first_source, grids = [], []
    for k in range(len(spans)):
        if k in replaced:
            row, grid = replaced[k]
            first_source.append(batch * length + row)
        else:
            first_source.append(spans.sample[k] * length + spans.start[k])
            grid = (spans.rows[k], spans.cols[k])
        grids.append(grid)
    # Each sample's new length and the rank of each image's first token, in one wait for the device.
    fetched = torch.cat([counts, rank[slot[host_tensor(first_source, device)]]]).tolist()
    new_counts, first_ranks = fetched[:batch], fetched[batch:]
    new_length = max(new_counts)
    starts = [new_length - new_counts[spans.sample[k]] + first_ranks[k] for k in range(len(spans))]

    column = new_length - counts[owner] + rank
    gather = torch.full((batch, new_length), padding_row, dtype=torch.long, device=device)
    gather[owner, column] = source
    hidden = torch.cat([flat, rows, flat.new_zeros(1, width)])[gather]
    valid = gather != padding_row
    # Each new token stands for one old token: itself, or its pooling window's first token.
    stands_for = torch.cat(
        [torch.arange(batch * length, device=device), representatives, torch.zeros(1, dtype=torch.long, device=device)]
    )[gather]
    first_valid = valid.int().argmax(1)
    batch_index = torch.arange(batch, device=device)

    labels = None
    if layout.labels is not None:
        labels = torch.where(valid, layout.labels.flatten()[stands_for], IGNORE_INDEX)
        # With left padding the first token's label would be predicted from a pad; alone it has no predecessor.
        labels[batch_index, first_valid] = IGNORE_INDEX
    positions = policy.after_shrink(policy.gather(layout.positions, stands_for), valid, position_mode)

    new_spans = VisualSpans(
        sample=list(spans.sample), start=starts, rows=[g[0] for g in grids], cols=[g[1] for g in grids],
        newline=list(spans.newline),
    )
    has_router = layout.query_index >= 0
    router_source = batch_index * length + layout.query_index.clamp(min=0)
    query_index = torch.where(has_router, column[slot[router_source]], -1)
    router_tokens = None
    if layout.router_tokens is not None:  # text tokens stand for themselves; new visual tokens are never router tokens
        router_tokens = layout.router_tokens.flatten()[stands_for] & valid
    return BatchLayout(hidden, valid, positions, labels, new_spans, query_index, router_tokens, new_counts), True


def with_newlines(plan: StagePlan, spans: VisualSpans, flat: torch.Tensor, rows: torch.Tensor, length: int):
    """The plan's new tokens with one newline token after every new row of a newline grid, their
    representatives, and each replaced grid's new extent.

    New row ``i`` of a grid that had ``H`` rows and now has ``R`` keeps the newline that ended old
    row ``min((i + 1) * ceil(H / R), H) - 1``: the last row a pooling window of ``ceil(H / R)`` rows
    covers (one row left of a token selection keeps the grid's last newline). The newline's hidden
    state passes through as it is: newlines are never pooled into visual content.
    """
    sizes = [r * c for r, c in plan.grids]
    if not any(spans.newline[k] for k in plan.spans):
        return rows, plan.representatives, sizes
    device = flat.device
    new_rows, new_representatives, extents, offset = [], [], [], 0
    for k, (r, c), size in zip(plan.spans, plan.grids, sizes):
        grid_rows, grid_sources = rows[offset:offset + size], plan.representatives[offset:offset + size]
        offset += size
        if not spans.newline[k]:
            new_rows.append(grid_rows)
            new_representatives.append(grid_sources)
            extents.append(size)
            continue
        step = -(-spans.rows[k] // r)
        newline = host_tensor([spans.newline_index(k, min((i + 1) * step, spans.rows[k]) - 1, length)
                               for i in range(r)], device)
        new_rows.append(torch.cat([grid_rows.view(r, c, -1), flat[newline][:, None]], 1).flatten(0, 1))
        new_representatives.append(torch.cat([grid_sources.view(r, c), newline[:, None]], 1).flatten())
        extents.append(r * (c + 1))
    return torch.cat(new_rows), torch.cat(new_representatives), extents
