import pytest
import torch

import hessext


@pytest.fixture
def threads():
    """torch.set_num_threads, with the count before the test restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(params=["fused", "gemm"])
def path(request):
    """Run the native CPU kernels through both of their paths (fused per-sample loops, GEMMs)."""
    native = hessext._native.load()
    old = native.set_fused_limits(10**9, 10**15) if request.param == "fused" else native.set_fused_limits(0, 0)
    yield request.param
    native.set_fused_limits(*old)
