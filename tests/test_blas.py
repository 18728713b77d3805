"""The CPU matrix products (csrc/gemm.h): every BLAS library found (OpenBLAS, and MKL and BLIS where
installed) computes what ATen computes for every operand layout the kernels pass (views, transposes,
size-1 and empty sides, float32/float64, in-place accumulation into views), anything it cannot take
goes to ATen, a library that will not load leaves ATen's products with the reason in `hessext.info`,
products cut into row pieces for OpenBLAS's small-matrix path equal the whole, the measured choice
per dtype and product class is cached and applied (each class served by its own library), and every
native op gives the same answers on any BLAS. Tolerances: 1e-12 relative (float64) and 1e-5
(float32) between two BLAS libraries, which sum the products in different orders."""

import pytest
import torch
import torch.nn as nn

import hessext
from hessext import _blas, _native
from tests.cases import assert_close

C = _native.load()
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
LIBRARIES = [name for name in _blas.LIBRARIES if _blas.candidates(name)]


def same(actual, expected, rtol, what):
    """assert_close, also for empty products (equal shapes then suffice)."""
    assert actual.shape == expected.shape, what
    if expected.numel():
        assert_close(actual, expected, rtol, what)


@pytest.fixture
def blas_choice():
    """Run a test under a named BLAS, and restore the default afterwards."""
    yield lambda choice: _blas.use(C, choice)
    _blas.use(C)


def operands(dtype):
    """(A [m, k], B [k, n]) pairs in every layout the kernels produce."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    big = r(40, 70)
    return [
        (r(33, 17), r(17, 9)),  # contiguous
        (r(17, 33).t(), r(9, 17).t()),  # both transposed
        (big[3:36, 5:22], big[:17, 30:39]),  # views with a long row stride
        (r(1, 17), r(17, 9)),
        (r(33, 1), r(1, 9)),  # size-1 sides
        (r(33, 17), r(17, 1)),
        (r(1, 1), r(1, 1)),
        (r(8, 2, 5)[:, 1, :], r(5, 6)),  # a row stride that is not the row length
        (r(6, 4).expand(6, 4)[::2], r(4, 3)),  # every other row
        (r(0, 5), r(5, 4)),
        (r(4, 0), r(0, 3)),
        (r(4, 5), r(5, 0)),  # empty
        (r(300, 120), r(120, 200)),  # large enough to be split over threads
        (r(120, 300).t(), r(200, 120).t()),
        # over 10^6 multiply-adds: row pieces on OpenBLAS's small-matrix path (gemm.cpp), uneven ones,
        (r(1000, 64), r(64, 63)),
        (r(64, 1001).t(), r(64, 64)),
        (r(1000, 64), r(64, 80)[:, 3:67].t()),  # B transposed with a long row stride: copied first
        (r(40, 60), r(900, 60).t()),  # C split by columns, then row pieces of each part
    ]


@pytest.fixture
def row_pieces():
    """Set whether products are cut into row pieces (gemm.cpp), and restore the default afterwards."""
    yield C.set_row_pieces
    C.set_row_pieces(True)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("pieces", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_products_equal_aten(library, dtype, pieces, blas_choice, row_pieces):
    name = blas_choice(library)
    assert name.startswith({"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS"}[library]), name
    row_pieces(pieces)
    assert C.row_pieces_on() == (pieces and any(t in name for t in ("SkylakeX", "Cooperlake", "SapphireRapids")))
    for A, B in operands(dtype):
        what = f"{tuple(A.shape)} strides {A.stride()} x {tuple(B.shape)} strides {B.stride()}"
        same(C.mm(A, B), A @ B, TOL[dtype], "mm " + what)
        bias = torch.randn(B.shape[1], dtype=dtype)
        same(C.addmm(bias, A, B), torch.addmm(bias, A, B), TOL[dtype], "addmm " + what)
        full = torch.randn(A.shape[0], B.shape[1], dtype=dtype)
        same(C.addmm(full, A, B), torch.addmm(full, A, B), TOL[dtype], "addmm full " + what)
        for out in (full.clone(), full.t().clone().t()):  # row-major, and a transposed view (ATen's)
            expected = out + A @ B
            C.addmm_(out, A, B)
            same(out, expected, TOL[dtype], "addmm_ " + what)


@pytest.mark.parametrize("library", LIBRARIES)
def test_in_place_into_a_row_block_view(library, blas_choice):
    blas_choice(library)
    whole = torch.randn(10, 12, dtype=torch.float64)
    A, B = torch.randn(4, 7, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    expected = whole.clone()
    expected[3:7, 2:7] += A @ B
    C.addmm_(whole[3:7, 2:7], A, B)
    assert torch.equal(whole[:3], expected[:3]) and torch.equal(whole[7:], expected[7:])
    assert_close(whole, expected, 1e-12, "row block view")


def test_other_dtypes_and_mismatches_are_atens():
    A, B = torch.arange(6).reshape(2, 3), torch.arange(12).reshape(3, 4)
    assert torch.equal(C.mm(A, B), A @ B)  # integers: ATen
    with pytest.raises(RuntimeError):
        C.mm(torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))


def test_a_library_that_will_not_load_leaves_aten(blas_choice, tmp_path):
    bad = tmp_path / "libnot_a_blas.so"
    bad.write_bytes(b"not a shared library")
    assert blas_choice(str(bad)) == "ATen"
    status = _blas.status()
    assert status["name"] == "ATen" and "dlopen failed" in status["why"]
    from hessext import info

    assert "ATen's: dlopen failed" in info.report()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_close(C.mm(x, x.t()), x @ x.t(), 1e-15, "ATen after a failed load")
    assert blas_choice("aten") == "ATen" and _blas.status()["why"] == "HESSEXT_BLAS=aten"


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("threads", [1, 2])
def test_native_ops_agree_on_any_blas(library, blas_choice, path, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 33), nn.Tanh(), nn.Linear(33, 20), nn.GELU(), nn.Linear(20, 3)).double()
        x, y = torch.randn(64, 7, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
        loss = nn.MSELoss()
        V = {n: torch.randn((4,) + p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
        calls = {
            "hvp": lambda: torch.cat([t.reshape(-1) for t in hessext.hvp(model, loss, x, y, V).values()]),
            "ggn_vp": lambda: torch.cat([t.reshape(-1) for t in hessext.ggn_vp(model, loss, x, y, V).values()]),
            "diag": lambda: torch.cat([t.reshape(-1) for t in hessext.hessian_diag(model, loss, x, y).values()]),
            "hessian": lambda: hessext.hessian(model, loss, x, y, output="matrix"),
            "input_hessian": lambda: hessext.input_hessian(model, loss, x, y),
        }
        for name, call in calls.items():
            blas_choice("aten")
            reference = call()
            blas_choice(library)
            assert_close(call(), reference, 1e-12, f"{name} ({library}, {path} path, {threads} threads)")
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif("openblas" not in LIBRARIES, reason="no OpenBLAS beside numpy or as scipy-openblas64")
@pytest.mark.parametrize("env", [{"OPENBLAS_CORETYPE": "Haswell"}, {"HESSEXT_OPENBLAS_CORETYPE": "SkylakeX"}])
def test_kernels_follow_torchs_cpu_capability(env):
    """hessext's copy takes the kernels of torch's CPU capability (SkylakeX with AVX-512) whatever
    OPENBLAS_CORETYPE says, or those HESSEXT_OPENBLAS_CORETYPE names; read at the library's first
    load, so each case runs in a process of its own. The products stay right."""
    import os
    import subprocess
    import sys

    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the SkylakeX kernels need AVX-512")
    if not any(os.sep + "scipy_openblas64" + os.sep in p for p in _blas.candidates("openblas")):
        pytest.skip(
            "numpy's own OpenBLAS copy keeps the kernels it chose when numpy was imported, before hessext "
            "loads it; the choice needs the scipy-openblas64 wheel"
        )
    code = (
        "import torch; from hessext import _native, _blas; C = _native.load(); "
        "A, B = torch.randn(300, 200, dtype=torch.float64), torch.randn(200, 100, dtype=torch.float64); "
        "print(_blas.status()['name']); print(float((C.mm(A, B) - A @ B).abs().max() / (A @ B).abs().max()))"
    )
    clean = {k: v for k, v in os.environ.items() if "CORETYPE" not in k}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(clean, HESSEXT_BLAS="openblas", **env),
    )
    name, err = out.stdout.strip().splitlines()[-2:]
    assert "SkylakeX kernels" in name and float(err) < 1e-13, out.stdout + out.stderr


def test_product_classes():
    """Narrow: the middle one of m, k, n at most 128 (an MLP of width 50-64, its weight products over
    a batch); wide: the rest."""
    assert [C.product_class(*s) for s in [(1024, 50, 50), (50, 1024, 50), (100, 1, 16), (4096, 128, 128)]] == [0] * 4
    assert [C.product_class(*s) for s in [(256, 784, 256), (256, 256, 10), (10, 256, 256), (129, 129, 1)]] == [1] * 4


@pytest.mark.skipif(not LIBRARIES, reason="no BLAS library found")
def test_measured_choice_is_cached_and_applied(blas_choice, tmp_path, monkeypatch):
    monkeypatch.setenv("HESSEXT_CACHE", str(tmp_path))
    monkeypatch.setattr(_blas, "ROUNDS", 1)
    blas_choice("auto")
    first = _blas.status()
    assert (tmp_path / "blas.json").exists() and first["measured"]
    assert set(first["choice"]) == {f"{d} {c}" for d in _blas.DTYPES for c in _blas.CLASSES}
    for slot, rates in first["rates"].items():  # every library loaded and ATen timed, the fastest chosen
        assert set(rates) == set(first["libraries"]) | {"ATen"} and all(r > 0 for r in rates.values())
        assert first["choice"][slot] == max(rates, key=rates.get)
    monkeypatch.setattr(_blas, "_measure", lambda *a: pytest.fail("measured again with the cache in place"))
    blas_choice("auto")
    assert _blas.status() == first
    from hessext import info

    assert "float64 narrow" in info.report() and "GFLOP/s" in info.report()


@pytest.mark.skipif(not LIBRARIES, reason="no BLAS library found")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_each_class_served_by_its_own_library(dtype, blas_choice):
    """Narrow products on one library, wide ones on another (or ATen), each class's products right."""
    blas_choice(LIBRARIES[-1])
    index = C.blas_names().index(_blas.status()["libraries"][0])
    C.blas_choose(dtype == torch.float64, 1, -1)  # wide ones on ATen
    g = torch.Generator().manual_seed(1)
    for m, k, n in [(300, 50, 40), (40, 300, 50), (200, 300, 260), (260, 200, 10)]:
        A, B = torch.randn(m, k, generator=g, dtype=dtype), torch.randn(k, n, generator=g, dtype=dtype)
        same(C.mm(A, B), A @ B, TOL[dtype], f"[{m}, {k}] x [{k}, {n}]")
    assert C.blas_choose(dtype == torch.float64, 0, index) == index


def test_choice_arguments_are_checked():
    with pytest.raises(ValueError, match="product_class"):
        C.blas_choose(True, 2, -1)
    with pytest.raises(ValueError, match="index"):
        C.blas_choose(True, 0, len(C.blas_names()))
