"""Which tokens a batch supervises, in Hugging Face's label convention.

``labels`` hold the target token id where the loss applies (the answers) and ``IGNORE_INDEX``
everywhere else (prompt, images, padding). The runtime reads it to find each sample's last
prompt token, PyramidDrop to find every answer span, the lab's collator to write it.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # what Hugging Face's losses skip


def supervised_tokens(labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(batch, length) bool: the real tokens the loss applies to."""
    return (labels != IGNORE_INDEX) & valid
