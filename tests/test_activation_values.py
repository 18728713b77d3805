"""The CPU's own tanh and sigmoid (csrc/cpu/exp_cpu.h: e^y from a polynomial, degree 11 in float64 and 5 in
float32, branch-free so that the loops vectorise) against torch's, at every instruction set this CPU runs
(hessext._C.simd):

- tanh, float64: off by at most 4.5e-16 absolute on [-30, 30] (about 2 units in the last place of 1;
  the form 1 - 2 / (1 + e^(2 z)) has an absolute, not a relative, error bound near 0, the same size as
  the rounding of the products that consume it); exactly +-1 beyond, +-1 at +-inf.
- sigmoid, float64: off by at most 5e-16 relative from z = -700 to 30; beyond -708 a value below
  3.4e-308 (torch: smaller or 0).
- float32 (in float arithmetic): tanh within 2.1 units in the last place of the value (torch's own on
  the CPU: 0.56; CUDA documents 2 for its tanhf), sigmoid within 2.5 down to the smallest normal float
  (torch's own: the same 2.47 on this grid); +-1, 0 and NaN where float64 has them.
- phi' and phi'' are the rows' formulas of the value (1 - a^2, -2 a (1 - a^2); a (1 - a), ...), within
  2e-15 of the same formulas on torch's value (the formulas' slopes in a are at most 4: 4 times the
  value's bound); NaN stays NaN."""

import pytest
import torch

from hessext import _native
from hessext.capture import SIGMOID, TANH

C = _native.load()
GRID = torch.cat(
    [
        torch.linspace(-30, 30, 600_001, dtype=torch.float64),
        torch.randn(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-3,
    ]
)


@pytest.fixture(params=["baseline", "avx2", "avx512"])
def simd(request):
    """Each instruction set this CPU has, set for the test's duration."""
    try:
        old = C.simd(request.param)
    except ValueError:
        pytest.skip(f"this CPU lacks {request.param}")
    yield request.param
    C.simd(old)


def derivatives(kind, a):
    d1 = 1 - a * a if kind == TANH else a * (1 - a)
    return d1, (-2 * a * d1 if kind == TANH else d1 * (1 - 2 * a))


def test_tanh_float64_within_its_absolute_bound(simd):
    a, d1, d2 = C.activation(GRID, TANH, 0.0, 0.0)
    ref = torch.tanh(GRID)
    assert (a - ref).abs().max().item() <= 4.5e-16
    for got, want in zip((d1, d2), derivatives(TANH, ref)):
        assert (got - want).abs().max().item() <= 2e-15


def test_sigmoid_float64_within_its_relative_bound(simd):
    z = torch.cat([GRID, torch.linspace(-700, -30, 100_001, dtype=torch.float64)])
    a, d1, d2 = C.activation(z, SIGMOID, 0.0, 0.0)
    ref = torch.sigmoid(z)
    assert ((a - ref).abs() / ref).max().item() <= 5e-16
    for got, want in zip((d1, d2), derivatives(SIGMOID, ref)):
        assert (got - want).abs().max().item() <= 2e-15


def ulps(got, ref):
    """|got - ref| in units in the last place of the float32 value ref (normal floats)."""
    return (got.double() - ref).abs() / torch.exp2(torch.floor(torch.log2(ref.abs())) - 23)


@pytest.mark.parametrize("kind, bound", [(TANH, 2.1), (SIGMOID, 2.5)])
def test_float32_within_its_units_in_the_last_place(simd, kind, bound):
    small = torch.logspace(-30, 1, 10_001, dtype=torch.float64)
    low = torch.linspace(-87, -30, 10_001, dtype=torch.float64)  # sigmoid down to the smallest normal floats
    z = torch.cat([GRID, small, low]).float()
    a, d1, d2 = C.activation(z, kind, 0.0, 0.0)
    assert a.dtype == torch.float32
    ref = (torch.tanh if kind == TANH else torch.sigmoid)(z.double())
    normal = ref.abs() >= 2.0**-126
    assert ulps(a[normal], ref[normal]).max().item() <= bound
    for got, want in zip((d1, d2), derivatives(kind, a)):  # the rows' formulas of the value, in float
        assert (got - want).abs().max().item() <= 2.4e-7  # a fused multiply-add or not: 2 units of 1


def test_float32_extremes_saturate_and_nan_stays_nan(simd):
    inf, nan = float("inf"), float("nan")
    z = torch.tensor([-inf, -1e4, -100.0, -9.1, 9.1, 100.0, 1e4, inf, nan, 0.0, -0.0])
    a, d1, _ = C.activation(z, TANH, 0.0, 0.0)
    assert a[:-3].tolist() == [-1.0] * 4 + [1.0] * 4 and a[-3].isnan() and a[-2:].eq(0).all()
    assert torch.equal(a[-2:].signbit(), torch.tensor([False, True])) and d1[:-3].eq(0).all()
    s, _, _ = C.activation(z, SIGMOID, 0.0, 0.0)
    assert s[:3].le(6.1e-39).all() and s[5:8].eq(1).all() and s[-3].isnan() and s[-2:].eq(0.5).all()


def test_extremes_saturate_and_nan_stays_nan(simd):
    inf, nan = float("inf"), float("nan")
    z = torch.tensor([-inf, -1e4, -708.5, -40.0, -19.5, 19.5, 40.0, 708.5, 1e4, inf, nan], dtype=torch.float64)
    a, d1, _ = C.activation(z, TANH, 0.0, 0.0)
    assert a[:-1].tolist() == [-1.0] * 5 + [1.0] * 5 and a[-1].isnan()
    assert d1[:-1].eq(0).all() and d1[-1].isnan()
    s, _, _ = C.activation(z, SIGMOID, 0.0, 0.0)
    assert s[:3].le(3.4e-308).all() and s[3:7].sub(torch.sigmoid(z[3:7])).abs().max() <= 1e-16
    assert s[7:-1].eq(1).all() and s[-1].isnan()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        C.activation(GRID, 99, 0.0, 0.0)
    with pytest.raises(ValueError, match="z"):
        C.activation(GRID.long(), TANH, 0.0, 0.0)
