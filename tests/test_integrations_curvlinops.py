"""hessext's curvlinops operators against curvlinops' own (3.0.1), float64: products with one vector and
with matrices, on MSE and cross-entropy, mean and sum, several batches, parameter subsets, block
structures, a native stack and a model torch.func serves; curvlinops' trace and diagonal estimators
and scipy's eigenvalues through to_scipy on both; the exact-diagonal operator against the dense
Hessian's diagonal. Tolerance 1e-10 relative to the largest reference entry. Skipped (with the reason)
where curvlinops is not installed."""

import pytest
import torch
import torch.nn as nn

curvlinops = pytest.importorskip("curvlinops", reason="curvlinops not installed (pip install hessext[curvlinops])")
from hessext.integrations import curvlinops as hc  # noqa: E402

from cases import assert_close  # noqa: E402

RTOL = 1e-10


def problem(loss, native=True, seed=0):
    torch.manual_seed(seed)
    if native:
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3)).double()
    else:
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(23, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (23,)) if isinstance(loss, nn.CrossEntropyLoss) else torch.randn(23, 3, dtype=torch.float64)
    return model, list(zip(X.split(8), y.split(8)))


CASES = [
    (nn.MSELoss(), True),
    (nn.MSELoss(reduction="sum"), True),
    (nn.CrossEntropyLoss(), True),
    (nn.CrossEntropyLoss(reduction="sum"), True),
    (nn.MSELoss(), False),
]


class AutogradHessian:
    """The data's Hessian in `params` by plain autograd (double backward per entry), as a dense operator."""

    def __init__(self, model, loss, params, data):
        N = sum(X.shape[0] for X, _ in data)
        P = sum(p.numel() for p in params)
        self.H = torch.zeros(P, P, dtype=torch.float64)
        for X, y in data:
            value = loss(model(X), y) * (X.shape[0] / N if loss.reduction == "mean" else 1.0)
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(value, params, create_graph=True)])
            for i in range(P):
                row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
                self.H[i] += torch.cat(
                    [(r if r is not None else torch.zeros_like(p)).reshape(-1) for r, p in zip(row, params)]
                )
        self.shape = self.H.shape

    def __matmul__(self, V):
        if isinstance(V, list):
            out = self.H @ torch.cat([v.reshape(-1) for v in V])
            return [o.reshape(v.shape) for o, v in zip(out.split([v.numel() for v in V]), V)]
        return self.H @ V


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("loss,native", CASES)
def test_products_equal_curvlinops(kind, loss, native):
    """The reference is curvlinops' own operator; for the Hessian of the LayerNorm model it is plain
    autograd (curvlinops 3.0.1's jvp-of-jacrev product is 5.5e-2 off it there, on torch 2.13)."""
    model, data = problem(loss, native)
    ours_cls, ref_cls = {
        "hessian": (hc.HessianLinearOperator, curvlinops.HessianLinearOperator if native else AutogradHessian),
        "ggn": (hc.GGNLinearOperator, curvlinops.GGNLinearOperator),
    }[kind]
    params = list(model.parameters())
    for chosen in (params, params[2:5]):  # all parameters, and a subset
        ours, ref = ours_cls(model, loss, chosen, data), ref_cls(model, loss, chosen, data)
        V = torch.randn(ours.shape[1], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        assert_close(ours @ V, ref @ V, RTOL, f"{kind} matrix product")
        assert_close(ours @ V[:, 0], ref @ V[:, 0], RTOL, f"{kind} vector product")
        listed = [v.clone() for v in torch.split(V[:, 0], [p.numel() for p in chosen])]
        listed = [v.reshape(p.shape) for v, p in zip(listed, chosen)]
        for a, b in zip(ours @ listed, ref @ listed):
            assert_close(a, b, RTOL, f"{kind} list-format product")


def test_blocks_equal_curvlinops():
    model, data = problem(nn.MSELoss())
    params = list(model.parameters())
    ours = hc.HessianLinearOperator(model, nn.MSELoss(), params, data, block_sizes=[2, 4])
    ref = curvlinops.HessianLinearOperator(model, nn.MSELoss(), params, data, block_sizes=[2, 4])
    V = torch.randn(ours.shape[1], 3, dtype=torch.float64)
    assert_close(ours @ V, ref @ V, RTOL, "block-diagonal Hessian")


def test_estimators_and_eigenvalues_run_on_hessext():
    import numpy as np
    from scipy.sparse.linalg import eigsh

    model, data = problem(nn.MSELoss())
    params = list(model.parameters())
    ours = hc.HessianLinearOperator(model, nn.MSELoss(), params, data)
    ref = curvlinops.HessianLinearOperator(model, nn.MSELoss(), params, data)
    for estimator in (curvlinops.hutchinson_trace, curvlinops.hutchpp_trace, curvlinops.hutchinson_diag):
        torch.manual_seed(3)
        a = estimator(ours, 21)
        torch.manual_seed(3)
        b = estimator(ref, 21)
        assert_close(torch.as_tensor(a), torch.as_tensor(b), 1e-9, estimator.__name__)
    a = eigsh(ours.to_scipy(), k=3, which="LA", v0=np.ones(ours.shape[0]))[0]
    b = eigsh(ref.to_scipy(), k=3, which="LA", v0=np.ones(ref.shape[0]))[0]
    assert np.allclose(np.sort(a), np.sort(b), rtol=1e-9, atol=1e-12)


def test_exact_diagonal_operator():
    model, data = problem(nn.MSELoss())
    params = list(model.parameters())
    dense = curvlinops.HessianLinearOperator(model, nn.MSELoss(), params, data) @ torch.eye(
        sum(p.numel() for p in params), dtype=torch.float64
    )
    D = hc.HessianDiagonalLinearOperator(model, nn.MSELoss(), params, data)
    v = torch.randn(D.shape[1], dtype=torch.float64)
    assert_close(D @ v, torch.diagonal(dense) * v, RTOL, "exact diagonal operator")
    assert_close(torch.cat([d.reshape(-1) for d in D.diagonal()]), torch.diagonal(dense), RTOL, "diagonal()")


def test_foreign_params_are_refused():
    model, data = problem(nn.MSELoss())
    other = nn.Linear(4, 3).double()
    with pytest.raises(ValueError, match="not a parameter of model_func"):
        hc.HessianLinearOperator(model, nn.MSELoss(), list(other.parameters()), data)


def test_example_runs():
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "curvlinops_fast.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1].split(": ")[1]) < 1e-10
