"""The Gramian (generalised Gauss-Newton matrix split at (u, grad_u, lap_u)) of physics-informed losses:
products, diagonal, dense matrix, factor rows and kernel against a reference built from torch.func
(jacrev of the points' jets in the parameters, the loss's Hessian in the jets by torch.func.hessian),
float64 to 1e-10 relative to the largest reference entry, on random native stacks with every activation,
several loss forms (Poisson, a subset of the features, a Burgers-like nonlinear term), sum and mean,
one and two outputs; the torch.func path for other models; and the energy natural gradient optimizer."""

import random
import warnings

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, jacrev, vmap

import hessext
from cases import ACTIVATIONS, assert_close


def losses(f):
    return {
        "poisson": lambda u, g, lap, x: ((-lap - f) ** 2).mean(),
        "poisson-sum": lambda u, g, lap, x: ((-lap - f) ** 2).sum(),
        "burgers": lambda u, g, lap, x: ((u * g[..., 0] - 0.1 * lap - f) ** 2).mean() + (u**2).mean(),
        "mixed": lambda u, g, lap, x: (torch.sin(u) * lap).sum() + (g**2).mean(),  # an indefinite H
    }


def case_of(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    act = ACTIVATIONS[seed % len(ACTIVATIONS)]
    widths = (
        [rng.randint(1, 3)]
        + [rng.choice([1, rng.randint(2, 6)]) for _ in range(rng.randint(1, 2))]
        + [rng.randint(1, 2)]
    )
    layers = []
    for j, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(i, o, bias=rng.random() < 0.7))
        if j < len(widths) - 2:
            layers.append(act())
    model = nn.Sequential(*layers).double()
    N, d = rng.choice([1, 6]), widths[0]
    x = torch.rand(N, d, dtype=torch.float64)
    f = torch.randn(N, widths[-1], dtype=torch.float64)
    dims = None if seed % 3 else sorted(rng.sample(range(d), rng.randint(1, d)))
    name = list(losses(f))[seed % 4]
    return model, losses(f)[name], x, dims, name


def reference(model, loss_fn, x, dims):
    """(G, gradient) by torch.func: J of the flat jet in the flat parameters, H of the loss in it."""
    names = [n for n, _ in model.named_parameters()]
    p0 = {n: t.detach() for n, t in model.named_parameters()}
    feats = list(range(x.shape[1])) if dims is None else dims
    N = x.shape[0]

    def jet(*vals):
        p = dict(zip(names, vals))

        def point(xi):
            return functional_call(model, p, (xi[None],))[0]

        u, g, h = vmap(point)(x), vmap(jacrev(point))(x), vmap(jacrev(jacrev(point)))(x)
        lap = sum(h[:, :, i, i] for i in feats)
        return torch.cat([u.reshape(-1), g[:, :, feats].reshape(-1), lap.reshape(-1)])

    e0 = jet(*p0.values())
    C = e0.numel() // (N * (len(feats) + 2))

    def loss_of(e):
        u, g, lap = e[: N * C], e[N * C : N * C * (1 + len(feats))], e[N * C * (1 + len(feats)) :]
        return loss_fn(u.reshape(N, C), g.reshape(N, C, len(feats)), lap.reshape(N, C), x)

    H = torch.func.hessian(loss_of)(e0)
    J = torch.cat([j.reshape(e0.numel(), -1) for j in jacrev(jet, argnums=tuple(range(len(names))))(*p0.values())], 1)
    return J.T @ H @ J, J.T @ torch.func.grad(loss_of)(e0)


@pytest.mark.parametrize("seed", range(24))
def test_gramian_against_torch_func(seed):
    model, loss_fn, x, dims, name = case_of(seed)
    G_ref, g_ref = reference(model, loss_fn, x, dims)
    op = hessext.GramianOperator(model, [(loss_fn, x)], dims=dims)
    assert "native=True" in repr(op)
    P = op.shape[0]
    V = torch.randn(P, 3, dtype=torch.float64)
    assert_close(op @ V, G_ref @ V, 1e-10, "G V")
    assert_close(op @ V[:, 0], G_ref @ V[:, 0], 1e-10, "G v")
    dense = op.dense()
    assert dense.grad_fn is None and op.diagonal().grad_fn is None
    assert_close(dense, G_ref, 1e-10, "dense G")
    assert torch.equal(dense, dense.T)
    assert_close(op.diagonal(), torch.diagonal(G_ref), 1e-10, "diagonal")
    assert_close(op.gradient(), g_ref, 1e-10, "gradient")
    if name.startswith("poisson"):  # a squared residual linear in the jet: G = B^T B, PSD
        B = op.jacobian()
        assert_close(B.T @ B, G_ref, 1e-10, "factor rows")
        assert_close(op.kernel(), B @ B.T, 1e-12, "kernel")
        assert float(torch.linalg.eigvalsh(dense).min()) >= -1e-10 * float(dense.abs().max())


def test_pinn_ggn_vp_formats_and_subsets():
    model, loss_fn, x, dims, _ = case_of(1)
    G_ref, _ = reference(model, loss_fn, x, dims)
    params = list(model.parameters())
    V = [torch.randn(2, *p.shape, dtype=torch.float64) for p in params]
    flat = torch.cat([v.reshape(2, -1) for v in V], 1)
    out = hessext.pinn_ggn_vp(model, loss_fn, x, V, dims=dims)
    assert_close(torch.cat([o.reshape(2, -1) for o in out], 1), flat @ G_ref, 1e-10, "batched list")
    assert_close(hessext.pinn_ggn_vp(model, loss_fn, x, flat[0], dims=dims), G_ref @ flat[0], 1e-10, "flat")
    named = dict(model.named_parameters())
    first = next(iter(named))
    sub = hessext.pinn_ggn_vp(model, loss_fn, x, {first: V[0][0]}, dims=dims, params={first: named[first]})
    n = params[0].numel()
    assert_close(sub[first].reshape(-1), G_ref[:n, :n] @ V[0][0].reshape(-1), 1e-10, "a parameter subset")


def test_several_terms_damping_and_solvers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x, xb = torch.rand(20, 2, dtype=torch.float64), torch.rand(6, 2, dtype=torch.float64)
    f = torch.ones(20, 1, dtype=torch.float64)

    def interior(u, g, lap, inputs):
        return ((-lap - f) ** 2).mean()

    def boundary(u, g, lap, inputs):
        return (u**2).mean()

    G1, _ = reference(model, interior, x, None)
    G2, _ = reference(model, boundary, xb, None)
    op = hessext.GramianOperator(model, [(interior, x), (boundary, xb)], damping=1e-3)
    eye = torch.eye(op.shape[0], dtype=torch.float64)
    assert_close(op.dense(), G1 + G2 + 1e-3 * eye, 1e-10, "two terms, damped")
    b = torch.randn(op.shape[0], dtype=torch.float64)
    x_cg = hessext.linalg.solve(op, b, method="cg", tol=1e-12)
    assert_close(x_cg, torch.linalg.solve(G1 + G2 + 1e-3 * eye, b), 1e-7, "CG solve on the operator")
    assert op.to_scipy().shape == op.shape


def test_torch_func_path_for_other_models():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).double()

        def forward(self, z):
            return self.net(z) * torch.cos(z[:, :1])

    model = Scaled()
    x = torch.rand(5, 2, dtype=torch.float64)
    loss_fn = losses(torch.randn(5, 1, dtype=torch.float64))["burgers"]
    G_ref, g_ref = reference(model, loss_fn, x, None)
    op = hessext.GramianOperator(model, [(loss_fn, x)])
    assert "native=False" in repr(op)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert_close(op @ v, G_ref @ v, 1e-10, "torch.func products")
    assert_close(op.dense(), G_ref, 1e-10, "torch.func dense")
    assert_close(op.gradient(), g_ref, 1e-10, "torch.func gradient")
    with pytest.raises(ValueError, match="backend='native'"):
        hessext.GramianOperator(model, [(loss_fn, x)], backend="native")


def test_errors():
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.rand(8, 2, dtype=torch.float64)

    def ok(u, g, lap, inputs):
        return (lap**2).mean()

    with pytest.raises(TypeError, match="list of"):
        hessext.GramianOperator(model, (ok, x))
    with pytest.raises(TypeError, match="terms"):
        hessext.GramianOperator(model, [])
    with pytest.raises(TypeError, match=r"terms\[0\]"):
        hessext.GramianOperator(model, [(ok, "points")])
    with pytest.raises(ValueError, match="damping"):
        hessext.GramianOperator(model, [(ok, x)], damping=-1.0)
    coupled = hessext.GramianOperator(model, [(lambda u, g, lap, inputs: lap.mean() ** 2, x)])
    with pytest.raises(ValueError, match="couples the collocation points"):
        coupled.dense()
    with pytest.raises(ValueError, match="scalar"):
        hessext.GramianOperator(model, [(lambda u, g, lap, inputs: lap, x)])
    with pytest.raises(ValueError, match="dims"):
        hessext.GramianOperator(model, [(ok, x)], dims=[5])
    op = hessext.GramianOperator(model, [(ok, x)])
    with pytest.raises(ValueError, match=r"shape \[17\]"):
        op @ torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="changed since"):
        op @ torch.zeros(17, dtype=torch.float64)
    with pytest.raises(ValueError, match="negative eigenvalue"):
        hessext.GramianOperator(model, [(lambda u, g, lap, inputs: (torch.sin(u) * lap).sum(), x)]).jacobian()
    with pytest.raises(ValueError, match="solver"):
        hessext.optim.ENGD(model, [(ok, x)], solver="qr")
    with pytest.raises(ValueError, match="woodbury"):
        hessext.optim.ENGD(model, [(ok, x)], solver="woodbury", damping=0.0)
    with pytest.raises(ValueError, match="lr"):
        hessext.optim.ENGD(model, [(ok, x)], lr=-1.0)


@pytest.mark.parametrize("solver", ["dense", "woodbury", "cg"])
def test_engd_steps_lower_the_loss_and_solvers_agree(solver):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.rand(40, 2, dtype=torch.float64)
    f = torch.sin(3 * x[:, :1])

    def interior(u, g, lap, inputs):
        return ((-lap - f) ** 2).mean()

    start = [p.detach().clone() for p in model.parameters()]
    opt = hessext.optim.ENGD(model, [(interior, x)], damping=1e-6, solver=solver, max_iter=500, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        losses_ = [float(opt.step()) for _ in range(3)]
    assert float(opt.loss()) < losses_[0]
    # one step from the same start with a fixed step length: the same direction from every solver
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    G = hessext.GramianOperator(model, [(interior, x)])
    want = torch.linalg.solve(G.dense() + 1e-6 * torch.eye(G.shape[0], dtype=torch.float64), G.gradient())
    hessext.optim.ENGD(model, [(interior, x)], lr=0.1, damping=1e-6, solver=solver, max_iter=500, tol=1e-12).step()
    moved = torch.cat([(s - p.detach()).reshape(-1) for p, s in zip(model.parameters(), start)]) / 0.1
    assert_close(moved, want, 1e-6, f"ENGD direction ({solver})")


def test_pinn_example_runs():
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "pinn_poisson.py")
    for optimizer in ("engd", "adam", "lbfgs"):
        out = subprocess.run(
            [sys.executable, script, "--optimizer", optimizer, "--steps", "3"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        last = out.stdout.strip().splitlines()[-1]
        assert last.startswith("relative L2 error: ") and float(last.split(": ")[1]) > 0
