"""Small host-side lists (indices, sizes) moved to the model's device without stalling it.

``torch.tensor(values, device="cuda")`` copies from pageable memory and so waits until the GPU has
finished every queued kernel. The runtime builds a few such lists at each stage; every wait would
leave the GPU idle while Python prepares the next kernels. A copy from pinned memory with
``non_blocking=True`` is queued like a kernel instead (PyTorch's pinned-memory cache keeps the
buffer alive until the copy is done).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def host_tensor(values: Sequence, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, queued rather than synchronised on CUDA."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
