"""The CPU's own tanh and sigmoid (csrc/cpu/exp_cpu.h: e^y from a degree-11 polynomial, branch-free so
that the loops vectorise) against torch's, at every instruction set this CPU runs (hessext._C.simd):

- tanh, float64: off by at most 4.5e-16 absolute on [-30, 30] (about 2 units in the last place of 1;
  the form 1 - 2 / (1 + e^(2 z)) has an absolute, not a relative, error bound near 0, the same size as
  the rounding of the products that consume it); exactly +-1 beyond, +-1 at +-inf.
- sigmoid, float64: off by at most 5e-16 relative from z = -700 to 30; beyond -708 a value below
  3.4e-308 (torch: smaller or 0).
- float32 (computed in double, rounded once): within half a unit in the last place of 1 (6e-8).
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


@pytest.mark.parametrize("kind", [TANH, SIGMOID])
def test_float32_within_half_a_unit_of_one(simd, kind):
    a, _, _ = C.activation(GRID.float(), kind, 0.0, 0.0)
    assert a.dtype == torch.float32
    ref = (torch.tanh if kind == TANH else torch.sigmoid)(GRID)
    assert (a.double() - ref).abs().max().item() <= 6e-8


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
