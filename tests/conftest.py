import pytest

import hessext


@pytest.fixture(params=["fused", "gemm"])
def path(request):
    """Run the native CPU kernels through both of their paths (fused per-sample loops, GEMMs)."""
    native = hessext._native.load()
    old = native.set_fused_limits(10**9, 10**15) if request.param == "fused" else native.set_fused_limits(0, 0)
    yield request.param
    native.set_fused_limits(*old)
