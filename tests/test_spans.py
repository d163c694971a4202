"""Visual spans: finding images in a padded batch and indexing their tokens."""

from __future__ import annotations

import pytest
import torch

from dpn.spans import find_visual_spans, ranks_within


def test_finds_every_image_in_order_across_samples():
    grid = (2, 2)
    mask = torch.zeros(3, 14, dtype=torch.bool)
    mask[0, 2:10] = True  # two images back to back
    mask[2, 0:4] = True  # one image at the very start
    mask[2, 9:13] = True  # and one later in the same sample
    spans = find_visual_spans(mask, grid)
    assert list(zip(spans.sample, spans.start)) == [(0, 2), (0, 6), (2, 0), (2, 9)]
    assert spans.tokens_per_sample(3) == [8, 0, 8]
    index = spans.token_index([1, 3], 14, torch.device("cpu"))
    assert index.tolist() == [6, 7, 8, 9, 2 * 14 + 9, 2 * 14 + 10, 2 * 14 + 11, 2 * 14 + 12]


def test_no_images_and_partial_grids():
    assert len(find_visual_spans(torch.zeros(2, 5, dtype=torch.bool), (2, 2))) == 0
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 1:4] = True
    with pytest.raises(ValueError, match="not a whole number"):
        find_visual_spans(mask, (2, 2))


def test_ranks_within_groups():
    assert ranks_within(torch.tensor([2, 0, 3]), 5).tolist() == [0, 1, 0, 1, 2]
