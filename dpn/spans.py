"""Where the images sit in a padded batch, and 2D pooling of their visual tokens.

An image is a contiguous run of ``rows * cols`` visual tokens laid out row-major. ``VisualSpans``
lists every image of a batch (sample, start, grid shape) in the current sequence layout; the
runtime updates it each time a stage shortens the sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dpn.transfer import host_tensor


@dataclass
class VisualSpans:
    """One entry per grid of visual tokens (an image has one or more): its sample, first position
    in the (padded) sequence, grid shape, and whether every row of the grid is followed by a
    newline token (LLaVA-NeXT's high-resolution grids). Newline tokens belong to the grid's
    *extent* in the sequence but are not visual tokens: they are never pooled."""

    sample: list[int] = field(default_factory=list)
    start: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    newline: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.newline) < len(self.sample):
            self.newline = self.newline + [False] * (len(self.sample) - len(self.newline))

    def __len__(self) -> int:
        return len(self.sample)

    def add(self, sample: int, start: int, grids, newline: bool = False) -> None:
        """Add an image (or frame group) laid out as consecutive ``grids`` from ``start`` (with
        ``newline``: every row of each grid ends with a newline token)."""
        for rows, cols in grids:
            self.sample.append(sample)
            self.start.append(start)
            self.rows.append(rows)
            self.cols.append(cols)
            self.newline.append(newline)
            start += rows * (cols + newline)

    def size(self, k: int) -> int:
        """Visual tokens of grid ``k``."""
        return self.rows[k] * self.cols[k]

    def extent(self, k: int) -> int:
        """Tokens grid ``k`` occupies in the sequence (its newlines included)."""
        return self.rows[k] * (self.cols[k] + self.newline[k])

    def tokens_per_sample(self, batch_size: int) -> list[int]:
        counts = [0] * batch_size
        for k, b in enumerate(self.sample):
            counts[b] += self.size(k)
        return counts

    def token_index(self, spans: list[int], seq_len: int, device: torch.device) -> torch.Tensor:
        """Flat (sample * seq_len + position) index of every visual token of ``spans`` (row-major,
        newlines skipped), concatenated in order."""
        if not any(self.newline[k] for k in spans):  # extent and visual tokens coincide
            return self.extent_index(spans, seq_len, device)
        counts = [self.size(k) for k in spans]
        total = sum(counts)
        sizes = host_tensor(counts, device)
        first = host_tensor([self.sample[k] * seq_len + self.start[k] for k in spans], device)
        cols = torch.repeat_interleave(host_tensor([self.cols[k] for k in spans], device), sizes, output_size=total)
        newline = torch.repeat_interleave(host_tensor([int(self.newline[k]) for k in spans], device), sizes,
                                          output_size=total)
        ranks = ranks_within(sizes, total)
        return torch.repeat_interleave(first, sizes, output_size=total) + ranks + (ranks // cols) * newline

    def extent_index(self, spans: list[int], seq_len: int, device: torch.device) -> torch.Tensor:
        """Flat index of every token in the extent of ``spans`` (visual tokens and newlines), in order."""
        counts = [self.extent(k) for k in spans]
        sizes = host_tensor(counts, device)
        first = host_tensor([self.sample[k] * seq_len + self.start[k] for k in spans], device)
        total = sum(counts)
        return torch.repeat_interleave(first, sizes, output_size=total) + ranks_within(sizes, total)

    def newline_index(self, k: int, row: int, seq_len: int) -> int:
        """Flat index of the newline token that ends ``row`` of newline grid ``k``."""
        return self.sample[k] * seq_len + self.start[k] + row * (self.cols[k] + 1) + self.cols[k]


def ranks_within(sizes: torch.Tensor, total: int) -> torch.Tensor:
    """For consecutive groups of ``sizes`` items (``total`` in all), each item's rank inside its group:
    0, 1, .., 0, 1, .. (``total`` is known on the host, so a GPU need not be waited for)."""
    group_start = torch.cumsum(sizes, 0) - sizes
    return torch.arange(total, device=sizes.device) - torch.repeat_interleave(group_start, sizes, output_size=total)


def find_visual_spans(image_mask: torch.Tensor, grids) -> VisualSpans:
    """Split each sample's runs of image tokens into images, each laid out as ``grids`` in order.

    ``grids`` is one image's grids, ``((rows, cols), ...)`` (a single ``(rows, cols)`` is one grid).
    Raises ``ValueError`` when a run is not a whole number of images: the visual tokens would not
    form the 2D grids the pyramid pools.
    """
    if isinstance(grids[0], int):
        grids = (tuple(grids),)
    spans = VisualSpans()
    size = sum(rows * cols for rows, cols in grids)
    for b, first, length in _runs(image_mask):
        if length % size:
            shape = " + ".join(f"{rows}x{cols}" for rows, cols in grids)
            raise ValueError(
                f"sample {b} has a run of {length} image tokens at position {first}, which is not a whole number of "
                f"{shape} = {size}-token image grids; the processor and the model's vision config disagree "
                "(check image_size, patch_size and vision_feature_select_strategy)"
            )
        for image in range(length // size):
            spans.add(b, first + image * size, grids)
    return spans


@dataclass(frozen=True)
class Grid:
    """A part of an item's layout: a ``rows x cols`` grid of visual tokens (``newline``: each row
    followed by a newline token)."""

    rows: int
    cols: int
    newline: bool = False

    @property
    def tokens(self) -> int:
        return self.rows * (self.cols + self.newline)


@dataclass(frozen=True)
class Gap:
    """A part of an item's layout: placeholder tokens that are no grid (a lone newline)."""

    count: int

    @property
    def tokens(self) -> int:
        return self.count


def spans_of_items(mask: torch.Tensor, items: list[tuple], kind: str = "image") -> VisualSpans:
    """Split the runs of placeholder tokens in ``mask`` into ``items`` (images or videos, in the
    order their features fill the batch: by sample, then position), each laid out as its parts
    (``Grid``, ``Gap``, or plain ``(rows, cols)`` grids). Raises ``ValueError`` when the runs and
    the items' sizes disagree."""
    spans = VisualSpans()
    remaining = [tuple(part if isinstance(part, (Grid, Gap)) else Grid(*part) for part in item) for item in items]
    for b, first, length in _runs(mask):
        start, end = first, first + length
        while start < end:
            if not remaining:
                raise ValueError(f"sample {b} has more {kind} tokens than the {kind} layouts describe")
            layout = remaining.pop(0)
            size = sum(part.tokens for part in layout)
            if start + size > end:
                raise ValueError(f"sample {b}: a run of {length} {kind} tokens at position {first} does not split into "
                                 f"the {kind}s its layouts describe ({size} tokens next)")
            for part in layout:
                if isinstance(part, Grid):
                    spans.add(b, start, [(part.rows, part.cols)], newline=part.newline)
                start += part.tokens
    if remaining:
        raise ValueError(f"the {kind} layouts describe {len(remaining)} more {kind}(s) than the batch has {kind} tokens for")
    return spans


def _runs(mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """(sample, first position, length) of every run of True in ``mask`` (batch, length), in order."""
    mask = mask.to(torch.int8)
    before = F.pad(mask[:, :-1], (1, 0))
    after = F.pad(mask[:, 1:], (0, 1))
    # Every run's first and last token, fetched in one transfer: rows (kind, sample, position) in
    # row-major order, so the starts come first and each list is sorted by sample, then position.
    edges = torch.stack([(mask == 1) & (before == 0), (mask == 1) & (after == 0)]).nonzero().tolist()
    starts = [edge[1:] for edge in edges if edge[0] == 0]
    ends = [edge[1:] for edge in edges if edge[0] == 1]
    return [(b, first, last - first + 1) for (b, first), (_, last) in zip(starts, ends)]


def merged(*parts: VisualSpans) -> VisualSpans:
    """The grids of several ``VisualSpans`` of one batch, ordered by sample and position."""
    entries = sorted((s.sample[k], s.start[k], s.rows[k], s.cols[k], s.newline[k]) for s in parts for k in range(len(s)))
    return VisualSpans(*(list(column) for column in zip(*entries))) if entries else VisualSpans()


def pool_grid(tokens: torch.Tensor, kernel: tuple[int, int], pooling: str) -> torch.Tensor:
    """Pool ``tokens`` of shape (n, rows, cols, d) with a ``kernel``-sized window and stride.

    Returns (n, ceil(rows / kh), ceil(cols / kw), d): when a stride does not divide the grid, the
    last row / column of windows covers what is left (max, or the mean of the tokens it covers).
    ``kernel == (1, 1)`` returns the tokens unchanged.
    """
    if kernel == (1, 1):
        return tokens
    channels_first = tokens.permute(0, 3, 1, 2)
    if pooling == "max":
        pooled = F.max_pool2d(channels_first, kernel_size=kernel, stride=kernel, ceil_mode=True)
    else:
        pooled = F.avg_pool2d(channels_first, kernel_size=kernel, stride=kernel, ceil_mode=True)
    return pooled.permute(0, 2, 3, 1)


def window_origins(rows: int, cols: int, kernel: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Row-major offset, inside a ``rows x cols`` grid, of the first (top-left) token of each pooling
    window, partial windows at the edges included."""
    out_rows = torch.arange(0, rows, kernel[0], device=device)
    out_cols = torch.arange(0, cols, kernel[1], device=device)
    return (out_rows[:, None] * cols + out_cols[None, :]).flatten()
