"""HessianOperator and hessext.linalg against dense float64 references on small networks
(torch.linalg.eigvalsh / solve of the dense Hessian): eigenpairs to 1e-8 of the largest eigenvalue,
solves to 1e-7 relative residual, Hutch++ exact when its sketch spans the space and unbiased
(the mean of 400 estimates within 4 standard errors), the SLQ density integrating to 1 with the
exact spectrum as its nodes when it runs P steps; the operator over a DataLoader equal (1e-12) to the
operator over the concatenated data, the GGN operator equal to ggn_vp, the scipy LinearOperator under
scipy's own eigsh, and a 2-process gloo operator over uneven shards equal to one process on all data."""

import os
import tempfile

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import hessext
from hessext import linalg
from tests.cases import assert_close


def small_problem(n=30, seed=0, loss=None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
    return model, loss or nn.MSELoss(), x, y


def dense(model, loss, x, y, curvature="hessian"):
    if curvature == "hessian":
        return hessext.hessian(model, loss, x, y, output="matrix", backend="torch.func")
    P = sum(p.numel() for p in model.parameters())
    return hessext.ggn_vp(model, loss, x, y, torch.eye(P, dtype=torch.float64), backend="torch.func")


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigsh_matches_eigvalsh(which):
    model, loss, x, y = small_problem()
    H = hessext.HessianOperator(model, loss, (x, y))
    Hd = dense(model, loss, x, y)
    ev = torch.linalg.eigvalsh(Hd)
    values, vectors = linalg.eigsh(H, k=5, which=which, tol=1e-10, generator=torch.Generator().manual_seed(0))
    order = {"LA": ev.argsort(descending=True), "SA": ev.argsort(), "LM": ev.abs().argsort(descending=True)}[which]
    expected = ev[order[:5]].sort(descending=True).values
    assert_close(values, expected, 1e-8, f"eigsh {which}", floor=ev.abs().max().item())
    assert bool((values[:-1] >= values[1:]).all())
    assert_close(Hd @ vectors, vectors * values, 1e-8, "eigenvectors", floor=ev.abs().max().item())
    assert_close(vectors.T @ vectors, torch.eye(5, dtype=torch.float64), 1e-10, "orthonormal")


def test_trace_exact_when_the_sketch_spans_and_unbiased():
    model, loss, x, y = small_problem()
    H = hessext.HessianOperator(model, loss, (x, y))
    exact = torch.trace(dense(model, loss, x, y)).item()
    P = H.shape[0]
    assert abs(linalg.trace(H, samples=3 * P) - exact) <= 1e-10 * abs(exact)
    Hd = dense(model, loss, x, y)
    g = torch.Generator().manual_seed(0)
    estimates = torch.tensor([linalg.trace(Hd, samples=12, generator=g) for _ in range(400)])
    stderr = estimates.std() / 20
    assert abs(estimates.mean().item() - exact) <= 4 * stderr.item()


def test_density_integrates_to_one_with_the_spectrum_as_nodes():
    model, loss, x, y = small_problem()
    Hd = dense(model, loss, x, y)
    ev = torch.linalg.eigvalsh(Hd)
    P = Hd.shape[0]
    grid, dens = linalg.density(
        Hd,
        num_steps=P,
        samples=4,
        generator=torch.Generator().manual_seed(0),
        sigma=1e-3 * (ev[-1] - ev[0]).item(),
        points=20000,
    )
    assert abs(torch.trapezoid(dens, grid).item() - 1) <= 1e-6
    assert grid[0] <= ev[0] and grid[-1] >= ev[-1]
    mean = torch.trapezoid(grid * dens, grid).item()  # the probes' Rayleigh quotients: trace / P on average
    assert abs(mean - ev.mean().item()) <= 0.5 * ev.abs().max().item()
    for lam in (ev[0], ev[-1]):  # mass near the extreme eigenvalues, none far outside the spectrum
        near = (grid - lam).abs() < 5e-3 * (ev[-1] - ev[0])
        assert dens[near].max() > 1e-3 * dens.max()
    plot_path = os.path.join(tempfile.mkdtemp(), "d.png")
    pytest.importorskip("matplotlib")
    linalg.plot_density(grid, dens, plot_path)
    assert open(plot_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method,curvature", [("minres", "hessian"), ("cg", "ggn")])
def test_solve_matches_dense(method, curvature):
    model, loss, x, y = small_problem()
    H = hessext.HessianOperator(model, loss, (x, y), curvature=curvature)
    D = dense(model, loss, x, y, curvature)
    ev = torch.linalg.eigvalsh(D)
    if method == "minres":  # a shift that keeps H + damping I indefinite and well away from singular
        shifts = torch.linspace(0.2, 0.6, 81, dtype=torch.float64)
        damping = shifts[torch.stack([(ev + s).abs().min() for s in shifts]).argmax()].item()
        assert (ev + damping).min() < 0 < (ev + damping).max()
    else:
        damping = 1e-2
    A = D + damping * torch.eye(H.shape[0], dtype=torch.float64)
    b = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    X = linalg.solve(H, b, damping=damping, method=method, tol=1e-10)
    assert ((A @ X - b).norm(dim=0) / b.norm(dim=0)).max() <= 1e-7
    x1 = linalg.solve(H, b[:, 0], damping=damping, method=method, tol=1e-10)
    assert x1.shape == (H.shape[0],)
    assert_close(x1, torch.linalg.solve(A, b[:, 0]), 1e-6, f"{method} solution")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_operator_over_a_dataloader_equals_the_concatenated_data(reduction):
    model, _, x, y = small_problem(n=31)
    loss = nn.MSELoss(reduction=reduction)
    loader = DataLoader(TensorDataset(x, y), batch_size=7)  # uneven: 7, 7, 7, 7, 3
    H_all = hessext.HessianOperator(model, loss, (x, y))
    H_loader = hessext.HessianOperator(model, loss, loader)
    V = torch.randn(H_all.shape[0], 4, dtype=torch.float64)
    assert_close(H_loader @ V, H_all @ V, 1e-12, "DataLoader vs concatenated")
    assert_close(H_loader @ V[:, 0], (H_all @ V)[:, 0], 1e-12, "one vector")
    assert_close(H_all @ V, dense(model, loss, x, y) @ V, 1e-10, "against the dense Hessian")


def test_ggn_operator_equals_ggn_vp_and_to_scipy():
    model, loss, x, y = small_problem()
    G = hessext.HessianOperator(model, loss, (x, y), curvature="ggn")
    V = torch.randn(G.shape[0], 3, dtype=torch.float64)
    assert_close(G @ V, hessext.ggn_vp(model, loss, x, y, V.T.contiguous()).T, 1e-12, "GGN operator")
    assert (G.shape, G.dtype, G.device) == ((G.shape[0], G.shape[0]), torch.float64, torch.device("cpu"))
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    H = hessext.HessianOperator(model, loss, (x, y))
    top = scipy_linalg.eigsh(H.to_scipy(), k=3, which="LA", tol=1e-10, return_eigenvectors=False)
    ev = torch.linalg.eigvalsh(dense(model, loss, x, y))
    assert_close(torch.tensor(sorted(top, reverse=True)), ev.flip(0)[:3], 1e-8, "scipy eigsh")


def test_errors_name_the_argument():
    model, loss, x, y = small_problem()
    H = hessext.HessianOperator(model, loss, (x, y))
    P = H.shape[0]
    cases = [
        (lambda: linalg.eigsh(H, k=P), ValueError, "k must be smaller"),
        (lambda: linalg.eigsh(H, k=2, which="BE"), ValueError, "which must be one of"),
        (lambda: linalg.eigsh(H, k=0), ValueError, "k must be a positive integer"),
        (lambda: linalg.trace(H, samples=0), ValueError, "samples must be a positive integer"),
        (lambda: linalg.density(H, samples=-1), ValueError, "samples must be a positive integer"),
        (
            lambda: linalg.solve(H, torch.zeros(P + 1, dtype=torch.float64)),
            ValueError,
            f"b must be a tensor of shape [{P}]",
        ),
        (lambda: linalg.solve(H, torch.zeros(P, dtype=torch.float64), method="lu"), ValueError, "method must be"),
        (lambda: H @ torch.zeros(P + 1, dtype=torch.float64), ValueError, f"v must have shape [{P}]"),
        (lambda: H @ torch.zeros(P, dtype=torch.float32), TypeError, "v must be torch.float64"),
        (lambda: hessext.HessianOperator(model, loss, 3), TypeError, "data must be"),
        (lambda: hessext.HessianOperator(model, loss, (x, y), curvature="fisher"), ValueError, "curvature must be"),
        (lambda: linalg.eigsh("H"), TypeError, "H must be"),
    ]
    for call, kind, text in cases:
        with pytest.raises(kind, match=text.replace("[", r"\[").replace("]", r"\]")):
            call()


def test_unknown_loss_needs_a_reduction_for_several_batches():
    model, _, x, y = small_problem()

    def loss(out, target):
        return torch.nn.functional.smooth_l1_loss(out, target) + torch.logsumexp(out, dim=(0, 1)) * 0.01

    one = hessext.HessianOperator(model, loss, (x, y))
    one @ torch.randn(one.shape[0], dtype=torch.float64)  # one batch: nothing to combine
    with pytest.raises(ValueError, match="reduction="):  # at the first product: the determinism check
        hessext.HessianOperator(model, loss, [(x[:15], y[:15]), (x[15:], y[15:])])
    two = hessext.HessianOperator(model, loss, [(x[:15], y[:15]), (x[15:], y[15:])], check_deterministic=False)
    with pytest.raises(ValueError, match="reduction="):
        two @ torch.randn(two.shape[0], dtype=torch.float64)


def _worker(rank, world, init, shards, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, loss, x, y = small_problem(n=29)
    lo, hi = shards[rank]
    H = hessext.HessianOperator(
        model, loss, DataLoader(TensorDataset(x[lo:hi], y[lo:hi]), batch_size=5), process_group=True
    )
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.save(H @ V, f"{out_path}.{rank}")
    dist.destroy_process_group()


def test_two_process_gloo_operator_equals_one_process():
    import torch.multiprocessing as mp

    tmp = tempfile.mkdtemp()
    init = "file://" + os.path.join(tmp, "rendezvous")
    shards = [(0, 20), (20, 29)]  # uneven
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, init, shards, os.path.join(tmp, "out"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"worker exit code {p.exitcode}"
    model, loss, x, y = small_problem(n=29)
    H = hessext.HessianOperator(model, loss, (x, y))
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    expected = H @ V
    for r in range(2):
        assert_close(torch.load(os.path.join(tmp, f"out.{r}")), expected, 1e-12, f"rank {r}")


def test_progress_bars(capsys):
    model, loss, x, y = small_problem()
    H = hessext.HessianOperator(model, loss, [(x[:15], y[:15]), (x[15:], y[15:])], progress=True)
    linalg.trace(H, samples=6)
    err = capsys.readouterr().err
    assert "trace" in err and "hessian product" in err
    linalg.eigsh(hessext.HessianOperator(model, loss, (x, y)), k=2, progress=True)
    assert "eigsh" in capsys.readouterr().err
    linalg.eigsh(hessext.HessianOperator(model, loss, (x, y)), k=2)
    assert capsys.readouterr().err == ""


def _check_eigenpairs(Hd, vals, vecs, k, which="LA", rtol=1e-8):
    ev = torch.linalg.eigvalsh(Hd)
    ref = {"LA": ev.flip(0)[:k], "SA": ev[:k], "LM": ev[ev.abs().argsort(descending=True)][:k]}[which]
    scale = float(ev.abs().max())
    assert_close(vals.sort().values, ref.sort().values, rtol, f"eigenvalues ({which}, k={k})", 1e-12 * scale)
    orth = (vecs.T @ vecs - torch.eye(k, dtype=vecs.dtype)).abs().max()
    assert orth < 1e-8, f"eigenvectors lost orthogonality: {float(orth):.2e}"
    res = (Hd @ vecs - vecs * vals).norm(dim=0).max()
    assert res <= 1e-7 * scale, f"residual {float(res):.2e} of a spectrum of size {scale:.2e}"


@pytest.mark.parametrize("rank,k", [(10, 3), (10, 10), (10, 14), (1, 2), (3, 6)])
def test_eigsh_on_exactly_rank_deficient_matrices(rank, k):
    """A float64 rank-r matrix: once the Krylov space holds the range, what is left of a product is
    rounding noise, which must not enter the basis (it gave [259, 29, 26] for [1.34, 1.26, 1.11])."""
    g = torch.Generator().manual_seed(rank)
    A = torch.randn(50, rank, generator=g, dtype=torch.float64)
    Hd = A @ A.T / 50
    vals, vecs = linalg.eigsh(Hd, k=k, generator=g)
    _check_eigenpairs(Hd, vals, vecs, k)


@pytest.mark.parametrize("case", ["linear", "dead-relu", "wide"])
def test_eigsh_on_rank_deficient_curvature(case):
    """Rank-deficient Hessians of real models: a linear model (rank <= features + 1 per output), a
    ReLU net with dead units, a network with many more parameters than samples times outputs."""
    torch.manual_seed(0)
    if case == "linear":
        model, n = nn.Sequential(nn.Linear(4, 3)).double(), 40
        x = torch.randn(n, 4, dtype=torch.float64)
        x[:, 3] = x[:, 0] - x[:, 1]  # dependent features: rank below 5 per output
    elif case == "dead-relu":
        model, n = nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 2)).double(), 30
        with torch.no_grad():
            model[0].bias[:6] = -100.0  # six units never fire
        x = torch.randn(n, 3, dtype=torch.float64)
    else:
        model, n = nn.Sequential(nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, 2)).double(), 3
        x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randn(n, model[-1].out_features, dtype=torch.float64)
    loss = nn.MSELoss()
    H = hessext.HessianOperator(model, loss, (x, y), curvature="ggn")
    Hd = dense(model, loss, x, y, "ggn")
    rank = int(torch.linalg.matrix_rank(Hd))
    assert rank < Hd.shape[0]
    for k in (3, rank, rank + 2):
        vals, vecs = linalg.eigsh(H, k=k, generator=torch.Generator().manual_seed(k))
        _check_eigenpairs(Hd, vals, vecs, k)


def test_eigsh_default_tolerance_follows_the_dtype():
    """float32 products cannot reach 1e-8: the default is sqrt(eps) of the dtype, met in a few dozen
    products (it took 1803 products and a warning with a fixed 1e-8)."""
    model, loss, x, y = small_problem()
    model, x, y = model.float(), x.float(), y.float()
    H = hessext.HessianOperator(model, loss, (x, y))
    calls = []
    orig = H.matmul
    H.matmul = lambda v: calls.append(v.shape[1] if v.dim() == 2 else 1) or orig(v)  # count products
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vals, _ = linalg.eigsh(H.matmul and _Counted(H, calls), k=3, generator=torch.Generator().manual_seed(0))
    assert sum(calls) <= 300, sum(calls)
    Hd = dense(model.double(), loss, x.double(), y.double())
    assert_close(vals, torch.linalg.eigvalsh(Hd).flip(0)[:3].float(), 1e-3, "float32 eigenvalues")


class _Counted:
    """An operator that counts the columns it is applied to."""

    def __init__(self, H, calls):
        self.H, self.calls, self.shape, self.dtype, self.device = H, calls, H.shape, H.dtype, H.device

    def __matmul__(self, v):
        self.calls.append(v.shape[1])
        return self.H.matmul(v)


def test_solvers_on_singular_and_indefinite_systems():
    """A singular PSD H with b outside its range: MINRES returns the minimum-residual solution and
    warns; CG on an indefinite H stops with a warning instead of diverging."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 5, generator=g, dtype=torch.float64)
    Hd = A @ A.T
    b = torch.randn(30, generator=g, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        x = linalg.solve(Hd, b)
    assert torch.isfinite(x).all()
    lsq = torch.linalg.pinv(Hd) @ b
    assert (Hd @ x - b).norm() <= (Hd @ lsq - b).norm() * (1 + 1e-6)
    b_in = Hd @ torch.randn(30, generator=g, dtype=torch.float64)  # in the range: solvable
    for method in ("minres", "cg"):
        x = linalg.solve(Hd, b_in, method=method)
        assert (Hd @ x - b_in).norm() <= 1e-6 * b_in.norm()
    indefinite = torch.diag(torch.linspace(-1, 2, 30, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        x = linalg.solve(indefinite, torch.ones(30, dtype=torch.float64), method="cg")
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        linalg.eigsh(Hd, k=2, max_iter=-1)


def _concatenated(model, loss, batches, **kw):
    """The operator over batches, and one call on the concatenated data, as dense matrices."""
    H = hessext.HessianOperator(model, loss, batches, **kw)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    one = hessext.HessianOperator(model, loss, (x, y))
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    return H @ eye, one @ eye


def test_batches_weighted_by_what_the_mean_divides_by():
    """Cross-entropy with ignore_index and class weights, and [B, T, d] batches of different T: the
    operator over batches equals one call on the concatenated data (0.61-0.93 and 0.32-0.39 relative
    error when each batch was weighted by inputs.shape[0])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    t = torch.randint(0, 4, (20,), generator=g)
    t[:7] = -100
    batches = [(x[:10], t[:10]), (x[10:], t[10:])]
    for loss in (
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)),
    ):
        got, ref = _concatenated(model, loss, batches)
        assert_close(got, ref, 1e-12, "cross-entropy batches")
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    seq_batches = [
        (torch.randn(2, T, 3, generator=g, dtype=torch.float64), torch.randn(2, T, 2, generator=g, dtype=torch.float64))
        for T in (3, 8)
    ]
    H = hessext.HessianOperator(seq, nn.MSELoss(), seq_batches)
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    ref = sum(hessext.hessian(seq, nn.MSELoss(reduction="sum"), xb, yb, output="matrix") for xb, yb in seq_batches)
    assert_close(H @ eye, ref / sum(yb.numel() for _, yb in seq_batches), 1e-12, "[B, T, d] batches")


def test_operator_data_checks_and_determinism():
    model, loss, x, y = small_problem()
    with pytest.raises(TypeError, match="one-shot iterator"):
        hessext.HessianOperator(model, loss, ((x[j : j + 10], y[j : j + 10]) for j in range(0, 30, 10)))
    with pytest.raises(TypeError, match="batch 0 is a dict"):
        hessext.HessianOperator(model, loss, [{"x": x, "y": y}])
    with pytest.raises(TypeError, match="batch 0 is a tuple of 3"):
        hessext.HessianOperator(model, loss, [(x, y, torch.ones(30))])
    with pytest.raises(TypeError, match="data must be"):
        hessext.HessianOperator(model, loss, {"x": x, "y": y}.items() and 5)
    dropout = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 2)).double()
    with pytest.raises(ValueError, match="not deterministic.*model.eval"):
        hessext.HessianOperator(dropout, loss, (x, y))
    hessext.HessianOperator(dropout.eval(), loss, (x, y))
    shuffled = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True)
    H = hessext.HessianOperator(model, loss, shuffled)  # a shuffle over all of the data: the same operator
    assert_close(H @ torch.eye(H.shape[0], dtype=torch.float64), dense(model, loss, x, y), 1e-10, "shuffled")


def test_density_and_trace_of_a_rank_deficient_matrix():
    """A rank-3 float64 matrix of size 50: the Lanczos runs end when their Krylov spaces do (no noise
    columns), the density puts the null space's 47/50 of the mass near 0 and integrates to 1, and
    Hutch++ with a sketch wider than the rank is exact."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 3, generator=g, dtype=torch.float64)
    H = A @ A.T
    grid, dens = linalg.density(H, num_steps=40, samples=8, generator=g)
    assert torch.isfinite(dens).all()
    assert abs(float(torch.trapezoid(dens, grid)) - 1) < 1e-9
    top = float(torch.linalg.eigvalsh(H).max())
    near_zero = float(torch.trapezoid(dens * (grid.abs() < 0.05 * top), grid))
    assert abs(near_zero - 47 / 50) < 0.05, near_zero
    assert abs(linalg.trace(H, samples=30, generator=g) - float(torch.trace(H))) < 1e-9 * float(torch.trace(H))


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_eigsh_values_criterion(tol):
    """criterion="values": each eigenvalue within tol * max |lambda| of the exact one, in fewer products
    than the residual test at the same tol (a clustered top of the spectrum, like a network's)."""
    g = torch.Generator().manual_seed(0)
    P = 400
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    lam = torch.cat(
        [
            torch.tensor([1.0, 0.99, 0.97, 0.96, 0.94], dtype=torch.float64),
            0.9 * torch.rand(P - 5, generator=g, dtype=torch.float64),
        ]
    )
    A = (Q * lam) @ Q.T
    runs = {}
    for criterion in ("values", "residual"):
        calls = []
        values, _ = linalg.eigsh(
            _Counted(A, calls), k=5, tol=tol, criterion=criterion, generator=torch.Generator().manual_seed(1)
        )
        assert float((values - lam[:5]).abs().max()) <= tol * 1.0
        runs[criterion] = sum(calls)
    assert runs["values"] < runs["residual"]
    with pytest.raises(ValueError, match="criterion"):
        linalg.eigsh(A, k=2, criterion="vectors")
