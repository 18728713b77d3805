"""The machinery of the CPU GEMM recurrences: the row blocks and vector blocks that split a call over
torch's threads (csrc/cpu/row_blocks.h, csrc/cpu/hvp.cpp) and the per-thread scratch arena
(csrc/workspace.h).

- Row blocks (one vector) and vector blocks (K = 5: blocks of 1-3 vectors, run in chunks of one vector
  at N = 1000, whose [N, 1, 80] intermediates exceed half of a 1 MB L2, and in one chunk at N = 100):
  HVPs, GGN-vector products and summed diagonals at 1, 2 and 3 threads, in tall blocks and short ones,
  against the float64 torch.func reference (1e-10 relative in float64, 1e-4 in float32).
- The arena: reusing it from call to call never changes an answer and never hands a caller memory
  that a later call writes; it grows to the largest call and stays within its cap; concurrent Python
  threads each use their own. Tolerance 1e-14 relative between two calls of the same op on the same
  data (the same products in the same order; only the memory they run in differs)."""

import threading

import torch
import torch.nn as nn

import pytest

import hessext
from hessext import _native, fallback
from tests.cases import assert_close, build_stack, random_batch

C = _native.load()
RTOL = 1e-14
KEEP_BYTES = 256 << 20


def case(widths, n, seed):
    """A Tanh stack wide enough for the GEMM path (widths above 64), its batch and one vector."""
    model = build_stack(widths, [True] * (len(widths) - 1), ["tanh"] * (len(widths) - 2), seed=seed)
    x, y = random_batch(widths[0], widths[-1], n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}
    return model, x, y, v


def hvp(c):
    model, x, y, v = c
    return hessext.hvp(model, nn.MSELoss(), x, y, v)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [100, 1000])
@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_blocks_match_reference(threads, n, K, dtype):
    model, x, y, _ = case([12, 80, 80, 3], n, n + K)
    model, x, y = model.to(dtype), x.to(dtype), y.to(dtype)
    loss_fn = nn.MSELoss(reduction="sum" if K == 5 else "mean")
    g = torch.Generator().manual_seed(K)
    V = {k: torch.randn((K,) + p.shape, generator=g, dtype=torch.float64) for k, p in model.named_parameters()}
    m64 = build_stack([12, 80, 80, 3], [True] * 3, ["tanh"] * 2, seed=n + K)
    p64 = {k: p.detach() for k, p in m64.named_parameters()}
    ref = {
        "hvp": fallback.hvp(m64, loss_fn, x.double(), y.double(), p64, V),
        "ggn_vp": fallback.ggn_vp(m64, loss_fn, x.double(), y.double(), p64, V),
    }
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, op in (("hvp", hessext.hvp), ("ggn_vp", hessext.ggn_vp)):
            got = op(model, loss_fn, x, y, {k: t.to(dtype) for k, t in V.items()}, backend="native")
            for k in V:
                assert_close(
                    got[k].double(),
                    ref[name][k],
                    1e-10 if dtype == torch.float64 else 1e-4,
                    f"{name} {k}, N={n}, K={K}, {threads} threads, {dtype}",
                )
    finally:
        torch.set_num_threads(old)


def test_reuse_across_sizes_keeps_answers_and_outputs():
    small, large = case([12, 80, 80, 3], 40, 0), case([30, 100, 90, 2], 500, 1)
    first = hvp(small)
    kept = {k: t.clone() for k, t in first.items()}
    hvp(large)  # grows the arena
    again = hvp(small)  # now inside the grown arena
    hvp(large)
    for k in kept:
        assert torch.equal(first[k], kept[k]), f"{k}: an earlier output changed under a later call"
        assert_close(again[k], kept[k], RTOL, k)


def test_arena_is_kept_and_capped():
    hvp(case([12, 80, 80, 3], 200, 2))
    kept = C.workspace_bytes()
    assert 0 < kept <= KEEP_BYTES
    hvp(case([12, 80, 80, 3], 20, 3))
    assert C.workspace_bytes() == kept, "a smaller call must run in the kept arena, not replace it"


def test_threads_use_their_own_arenas():
    cases = [case([12, 80, 80, 3], n, seed) for seed, n in enumerate((30, 300, 70, 500))]
    serial = [hvp(c) for c in cases]
    results, errors = [None] * len(cases), []

    def worker(j):
        try:
            for _ in range(5):
                results[j] = hvp(cases[j])
        except Exception as e:  # reported below, with the thread
            errors.append((j, e))

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for j, (got, want) in enumerate(zip(results, serial)):
        for k in want:
            assert_close(got[k], want[k], RTOL, f"thread {j}, {k}")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_row_blocks_diagonals_match_reference(threads):
    """Summed diagonals on the GEMM path (width 70 > 64) in 2-3 blocks of 333-500 samples, against the
    diagonal of torch.func's dense Hessian (1e-10 relative) and the GGN's (1e-10)."""
    model = build_stack([6, 70, 2], [True, True], [nn.Tanh], seed=3)
    x, y = random_batch(6, 2, 1000, seed=3)
    names = [n for n, _ in model.named_parameters()]
    ref_h = torch.diagonal(hessext.hessian(model, nn.MSELoss(), x, y, output="matrix", backend="torch.func"))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = hessext.hessian_diag(model, nn.MSELoss(), x, y, backend="native")
        ggn = hessext.ggn_diag(model, nn.MSELoss(), x, y, backend="native")
    finally:
        torch.set_num_threads(old)
    assert_close(torch.cat([got[n].reshape(-1) for n in names]), ref_h, 1e-10, f"Hessian diagonal, {threads} threads")
    ref_g = hessext.ggn_diag(model, nn.MSELoss(), x, y, backend="torch.func")
    for n in names:
        assert_close(ggn[n], ref_g[n], 1e-10, f"GGN diagonal {n}, {threads} threads")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_blocks_input_derivatives_match_reference(threads, dtype):
    """Laplacians and input Hessians (jets, per-sample results) in 1-3 row blocks of 333-1000 samples,
    stacked in row order, against torch.func (1e-10 relative in float64, 1e-4 in float32). A block
    whose rows landed in the wrong place, or a bias added twice, fails by far more."""
    model = build_stack([3, 40, 40, 2], [True, False, True], [nn.Tanh, nn.Sigmoid], seed=5)
    x, y = random_batch(3, 2, 1000, seed=5)
    loss = nn.MSELoss(reduction="sum")
    lap_ref = hessext.laplacian(model, x, backend="torch.func")
    hess_ref = hessext.input_hessian(model, loss, x, y, backend="torch.func")
    model32, x32, y32 = (
        model.to(dtype).requires_grad_(False),
        x.to(dtype),
        y.to(dtype),
    )  # frozen weights: input derivatives run natively (with trainable ones they carry a gradient, through torch.func)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lap = hessext.laplacian(model32, x32, backend="native")
        hess = hessext.input_hessian(model32, loss, x32, y32, backend="native")
        diag = hessext.input_hessian(model32, loss, x32, y32, diagonal=True, backend="native")
    finally:
        torch.set_num_threads(old)
    assert_close(lap.double(), lap_ref, tol, f"Laplacian, {threads} threads, {dtype}")
    assert_close(hess.double(), hess_ref, tol, f"input Hessian, {threads} threads, {dtype}")
    assert_close(
        diag.double(), torch.diagonal(hess_ref, dim1=1, dim2=2), tol, f"input Hessian diagonal, {threads} threads"
    )


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("threads", [1, 2])
def test_row_chunks_match_reference(loss_name, K, threads):
    """hvp_rows (csrc/cpu/hvp.cpp) runs the rows of a stack no wider than 128 in chunks that fit the L2
    cache, each chunk's sums over samples added to the last ones': N = 700 at width 96 takes several
    chunks per call (a 64-row chunk at K = 4), with each activation kind (curved, piecewise linear, none),
    bias on and off, and the softmax head (its weights per row, 0 for ignored targets, read at the
    chunk's rows). HVPs and GGN-vector products against the float64 torch.func reference, 1e-10
    relative."""
    torch.manual_seed(K)
    model = nn.Sequential(
        nn.Linear(7, 96),
        nn.Tanh(),
        nn.Linear(96, 96, bias=False),
        nn.ReLU(),
        nn.Linear(96, 90),
        nn.Sigmoid(),
        nn.Linear(90, 5),
    ).double()
    n = 700
    x = torch.randn(n, 7, dtype=torch.float64)
    if loss_name == "mse":
        loss_fn, y = nn.MSELoss(reduction="sum"), torch.randn(n, 5, dtype=torch.float64)
    else:
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, 5, (n,))
        y[::7] = -100  # ignored rows: their softmax head weight is 0, the others' 1 / count
    g = torch.Generator().manual_seed(K)
    V = {k: torch.randn((K,) + p.shape, generator=g, dtype=torch.float64) for k, p in model.named_parameters()}
    p64 = {k: p.detach() for k, p in model.named_parameters()}
    old_threads = torch.get_num_threads()
    old_limits = C.set_fused_limits(0, 0)
    torch.set_num_threads(threads)
    try:
        for op, ref_op in ((hessext.hvp, fallback.hvp), (hessext.ggn_vp, fallback.ggn_vp)):
            got = op(model, loss_fn, x, y, V, backend="native")
            ref = ref_op(model, loss_fn, x, y, p64, V)
            for k in V:
                assert_close(got[k], ref[k], 1e-10, f"{op.__name__} {k}, {loss_name}, K={K}, {threads} threads")
    finally:
        torch.set_num_threads(old_threads)
        C.set_fused_limits(*old_limits)
