"""hessext's laplace-torch backends (0.3), float64: the batch's diagonal and dense GGN and Hessian in
laplace-torch's scaling against references (laplace-torch's own torch.func GGN from per-sample
Jacobians; plain autograd's dense Hessian), to 1e-10 relative to the largest entry, for regression and
classification; `Laplace(...).fit` with each backend equal to laplace-torch's curvlinops backend
(diag: to 1e-10; full: to 1e-6, where curvlinops multiplies with a float32 identity); last-layer
Laplace served by the curvlinops computation. Skipped (with the reason) without laplace-torch."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace", reason="laplace-torch not installed (pip install hessext[laplace])")
from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN, GGNInterface  # noqa: E402

from hessext.integrations.laplace import HessextGGN, HessextHessian  # noqa: E402

from cases import assert_close  # noqa: E402


def problem(likelihood, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 3)).double()
    X = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randn(40, 3, dtype=torch.float64) if likelihood == "regression" else torch.randint(0, 3, (40,))
    return model, X, y


def autograd_hessian(backend, x, y):
    params = list(backend.params_dict.values())
    loss = backend.factor * backend.lossfunc(backend.model(x), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.autograd.grad(g[i], params, retain_graph=True) for i in range(g.numel())]
    return torch.stack([torch.cat([r.reshape(-1) for r in row]) for row in rows])


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_backend_curvatures_against_references(likelihood):
    model, x, y = problem(likelihood)
    ggn = HessextGGN(model, likelihood)
    ref_loss, ref_diag = CurvlinopsGGN(model, likelihood).diag(x, y)
    loss, d = ggn.diag(x, y)
    assert_close(d, ref_diag, 1e-10, "GGN diagonal")
    assert_close(loss, ref_loss, 1e-12, "loss")
    _, full = ggn.full(x, y)
    assert_close(full, GGNInterface.full(ggn, x, y)[1], 1e-10, "dense GGN")
    hess = HessextHessian(model, likelihood)
    H = autograd_hessian(hess, x, y)
    assert_close(hess.full(x, y)[1], H, 1e-10, "dense Hessian")
    assert_close(hess.diag(x, y)[1], torch.diagonal(H), 1e-10, "Hessian diagonal")


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_laplace_fit_equals_the_curvlinops_backend(likelihood, structure):
    model, X, y = problem(likelihood)
    loader = DataLoader(TensorDataset(X, y), batch_size=16)
    fitted = {}
    for backend in (HessextGGN, CurvlinopsGGN):
        la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, backend=backend)
        la.fit(loader)
        fitted[backend] = (la.posterior_precision, la.log_marginal_likelihood().item())
    rtol = 1e-10 if structure == "diag" else 1e-6
    assert_close(fitted[HessextGGN][0], fitted[CurvlinopsGGN][0], rtol, "posterior precision")
    assert abs(fitted[HessextGGN][1] - fitted[CurvlinopsGGN][1]) <= rtol * abs(fitted[CurvlinopsGGN][1])


def test_last_layer_laplace_is_served():
    model, X, y = problem("regression")
    loader = DataLoader(TensorDataset(X, y), batch_size=16)
    fitted = {}
    for backend in (HessextGGN, CurvlinopsGGN):
        la = Laplace(model, "regression", subset_of_weights="last_layer", hessian_structure="diag", backend=backend)
        la.fit(loader)
        fitted[backend] = la.posterior_precision
    assert_close(fitted[HessextGGN], fitted[CurvlinopsGGN], 1e-12, "last-layer posterior precision")


def test_example_runs():
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "laplace_fast.py")
    out = subprocess.run([sys.executable, script, "--points", "256"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1].split(": ")[1]) < 1e-10


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_predictive_and_kron_equal_the_curvlinops_backend(likelihood):
    """The predictive of a diagonal Laplace, and a Kronecker-factored one (whose factors are curvlinops'
    KFAC in either backend), equal laplace-torch's curvlinops backend's."""
    model, X, y = problem(likelihood)
    loader = DataLoader(TensorDataset(X, y), batch_size=16)
    for structure, rtol in (("diag", 1e-10), ("kron", 1e-12)):
        out = {}
        for backend in (HessextGGN, CurvlinopsGGN):
            la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, backend=backend)
            la.fit(loader)
            pred = la(X[:5], pred_type="glm", link_approx="probit") if likelihood == "classification" else la(X[:5])
            out[backend] = torch.cat([p.reshape(-1) for p in (pred if isinstance(pred, tuple) else (pred,))])
        assert_close(out[HessextGGN], out[CurvlinopsGGN], rtol, f"{structure} predictive")


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_kron_fit_equals_the_curvlinops_backend(likelihood, monkeypatch):
    """hessext's Kronecker factors (kfac_factors) give laplace-torch's KFAC posterior and marginal
    likelihood, over a loader of several batches (the factors rescaled per batch as laplace-torch does)."""
    from hessext import kfac

    model, X, y = problem(likelihood)
    loader = DataLoader(TensorDataset(X, y), batch_size=16)
    calls = []
    monkeypatch.setattr(kfac, "kfac_factors", lambda *a, _f=kfac.kfac_factors: calls.append(1) or _f(*a))
    fitted = {}
    for backend in (HessextGGN, CurvlinopsGGN):
        la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure="kron", backend=backend)
        la.fit(loader)
        fitted[backend] = (la.posterior_precision.to_matrix(), la.log_marginal_likelihood().item())
    assert len(calls) == 3  # one per batch: hessext's factors, not curvlinops'
    assert_close(fitted[HessextGGN][0], fitted[CurvlinopsGGN][0], 1e-12, "KFAC posterior precision")
    assert abs(fitted[HessextGGN][1] - fitted[CurvlinopsGGN][1]) <= 1e-12 * abs(fitted[CurvlinopsGGN][1])
