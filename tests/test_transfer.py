"""host_tensor: host lists reach the device with the values and dtype asked for."""

from __future__ import annotations

import pytest
import torch

from dpn.transfer import host_tensor


def test_host_tensor_keeps_values_and_dtype_on_cpu():
    index = host_tensor([3, 1, 2], torch.device("cpu"))
    assert index.dtype == torch.long and index.tolist() == [3, 1, 2]
    scales = host_tensor([0.5, 2.0], torch.device("cpu"), torch.float32)
    assert scales.dtype == torch.float32 and scales.tolist() == [0.5, 2.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_tensor_on_cuda_does_not_synchronise():
    device = torch.device("cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        index = host_tensor([4, 5], device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert index.device.type == "cuda" and index.cpu().tolist() == [4, 5]
