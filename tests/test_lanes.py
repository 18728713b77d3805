"""The CPU sample-lane kernel (csrc/cpu/lanes.h): HVPs or GGN-vector products on a narrow stack,
8 samples per pass of the fused recurrence (then the vectors in groups of 4, and the rest one at a
time), compiled for AVX-512, AVX2 and baseline x86-64.

For every instruction set this CPU has (`hessext._C.simd`), batch sizes around the lane count (1, 7,
8, 9, 17, 100: the lanes past the batch are zero rows), 1 to 3 threads (blocks of lanes per
thread), every loss row (MSE, Huber, BCE with logits, cross-entropy with its softmax Hessian), bias on
and off, float32 and float64, one vector unbatched, as [1, *shape] and six as [6, *shape] (a group of
four and two alone): against
the float64 torch.func reference. Tolerance: 1e-10 relative to the largest reference entry in float64, 2e-4 in float32
(tests/cases.py RTOL). The instruction sets against each other: 1e-13 in float64 (the same
operations; only fused multiply-adds and the order of the final sum over lanes differ)."""

import pytest
import torch
import torch.nn as nn

import hessext
from hessext import _native, fallback
from tests.cases import RTOL, assert_close, build_stack, reference_hessian

C = _native.load()
SIMD = ["baseline", "avx2", "avx512"][: ["baseline", "avx2", "avx512"].index(C.simd()) + 1] if C else []
pytestmark = pytest.mark.skipif(C is None, reason="native module unavailable")

LOSSES = {
    "mse": lambda: nn.MSELoss(),
    "huber": lambda: nn.HuberLoss(delta=0.5, reduction="sum"),
    "bce": lambda: nn.BCEWithLogitsLoss(),
    "ce": lambda: nn.CrossEntropyLoss(reduction="sum"),
}


def problem(loss, n, bias, seed):
    """A narrow Tanh stack (on the fused path) with a batch and targets for `loss`."""
    widths = [3, 8, 5, 4]
    model = build_stack(widths, [bias, not bias, bias], ["tanh", "tanh"], seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], generator=g, dtype=torch.float64)
    if loss == "ce":
        y = torch.randint(0, widths[-1], (n,), generator=g)
    elif loss == "bce":
        y = torch.rand(n, widths[-1], generator=g, dtype=torch.float64)
    else:
        y = 2 * torch.randn(n, widths[-1], generator=g, dtype=torch.float64)
    v = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in model.named_parameters()}
    six = {k: torch.randn((6,) + p.shape, generator=g, dtype=torch.float64) for k, p in model.named_parameters()}
    return model, x, y, v, six


@pytest.fixture
def simd():
    before = C.simd()
    yield C.simd
    C.simd(before)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 17, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_lanes_match_reference(loss, n, bias, simd, threads):
    model, x, y, v, six = problem(loss, n, bias, seed=n)
    loss_fn = LOSSES[loss]()
    p64 = {k: p.detach() for k, p in model.named_parameters()}
    vb = {k: t.unsqueeze(0) for k, t in v.items()}
    ref = {
        name: f(model, loss_fn, x, y, p64, {k: torch.cat([vb[k], six[k]]) for k in v})
        for name, f in (("hvp", fallback.hvp), ("ggn_vp", fallback.ggn_vp))
    }
    assert hessext.plan(model, loss_fn).backend == "native"
    for dtype in (torch.float64, torch.float32):
        m, xd = model.to(dtype), x.to(dtype)
        yd = y if loss == "ce" else y.to(dtype)
        for isa in SIMD:
            simd(isa)
            for nt in (1, 2, 3):
                threads(nt)
                for name, op in (("hvp", hessext.hvp), ("ggn_vp", hessext.ggn_vp)):
                    one = op(m, loss_fn, xd, yd, {k: t.to(dtype) for k, t in v.items()}, backend="native")
                    batched = op(m, loss_fn, xd, yd, {k: t.to(dtype) for k, t in vb.items()}, backend="native")
                    several = op(m, loss_fn, xd, yd, {k: t.to(dtype) for k, t in six.items()}, backend="native")
                    for k in v:
                        what = f"{name} {k}: {loss}, N={n}, bias={bias}, {dtype}, {isa}, {nt} threads"
                        assert one[k].shape == v[k].shape and batched[k].shape == vb[k].shape, what
                        assert several[k].shape == six[k].shape, what
                        assert_close(one[k], ref[name][k][0], RTOL[dtype], what)
                        assert_close(batched[k], ref[name][k][:1], RTOL[dtype], what + ", batched")
                        assert_close(several[k], ref[name][k][1:], RTOL[dtype], what + ", six vectors")
        model.double()


@pytest.mark.parametrize("loss", list(LOSSES))
def test_instruction_sets_agree(loss, simd):
    model, x, y, v, _ = problem(loss, 100, True, seed=5)
    loss_fn = LOSSES[loss]()
    answers = {}
    for isa in SIMD:
        simd(isa)
        answers[isa] = hessext.hvp(model, loss_fn, x, y, v, backend="native")
    for isa in SIMD[1:]:
        for k in v:
            assert_close(answers[isa][k], answers["baseline"][k], 1e-13, f"{k}: {isa} against baseline")


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("n", [1, 9, 100])
def test_dense_hessian_per_instruction_set(loss, n, path, simd, threads):
    """The dense Hessian through both paths (the fused per-sample loops, the GEMMs), its activation
    passes compiled for each instruction set, against the float64 torch.func Hessian (RTOL), in float64
    and float32, on one and two threads."""
    model, x, y, _, _ = problem(loss, n, True, seed=40 + n)
    loss_fn = LOSSES[loss]()
    ref = reference_hessian(model, loss_fn, x, y)
    assert hessext.plan(model, loss_fn).backend == "native"
    for dtype in (torch.float64, torch.float32):
        m, xd = model.to(dtype), x.to(dtype)
        yd = y if loss == "ce" else y.to(dtype)
        for isa in SIMD:
            simd(isa)
            for nt in (1, 2):
                threads(nt)
                H = hessext.hessian(m, loss_fn, xd, yd, output="matrix", backend="native")
                what = f"{loss}, N={n}, {path}, {dtype}, {isa}, {nt} threads"
                assert torch.equal(H, H.T), what
                assert_close(H, ref, RTOL[dtype], what)
        model.double()


def test_simd_refuses_unknown_names(simd):
    with pytest.raises(ValueError, match="simd must be one of"):
        simd("sse9")


@pytest.mark.skipif("avx2" not in SIMD, reason="needs a CPU with AVX2")
def test_torchs_cpu_capability_holds_the_kernels_to_it():
    """ATEN_CPU_CAPABILITY=avx2 (how a developer on an AVX-512 machine sees the AVX2 picture) holds
    hessext's vector loops and its OpenBLAS's kernels to AVX2 as it holds torch's."""
    import os
    import subprocess
    import sys

    code = (
        "import torch; from hessext import _native, _blas; C = _native.load(); "
        "print(torch.backends.cpu.get_cpu_capability(), C.simd(), _blas.status()['name'])"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    capability, lanes = out.split()[:2]
    assert (capability, lanes) == ("AVX2", "avx2"), out
    assert "SkylakeX" not in out, f"OpenBLAS kept its AVX-512 kernels: {out}"
