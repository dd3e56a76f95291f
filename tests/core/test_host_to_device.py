"""host_to_device: values and dtype kept; on CUDA the copy is asynchronous (no stream sync)."""

import pytest
import torch

from mhla_core.ops.utils import host_to_device


def test_cpu_copy_keeps_values():
    t = torch.tensor([3, 70, 129])
    out = host_to_device(t // 64, "cpu")
    assert out.dtype == torch.long and out.tolist() == [0, 1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_is_async_and_exact():
    t = torch.randint(0, 1000, (17,))
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = host_to_device(t, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.is_cuda and torch.equal(out.cpu(), t)
