"""Where the kernels and torch could part ways at a single point: the branch taken at a loss's or an
activation's kink, NaN propagation, overflow in a derivative, and a call that leaves the kernels
while backend="native" was asked for. References: torch autograd double backward, float64.
Tolerance: 1e-10 relative to the largest reference entry."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hessext
from cases import assert_close


def autograd_hvp(model, loss_fn, x, y, v):
    params = list(model.parameters())
    g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    hv = torch.autograd.grad(g, params, grad_outputs=v, allow_unused=True)
    return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params)])


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_huber_at_exactly_delta_takes_autograds_branch():
    """|r| == delta: autograd's second derivative there is 0 (the native kernel took the quadratic
    branch: hvp off by 1.78 relative). A zero-initialised output layer with targets of +-1 and delta 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (8, 2)).double() * 2 - 1
    loss = nn.HuberLoss(delta=1.0)
    v = [torch.randn_like(p) for p in model.parameters()]
    ref = autograd_hvp(model, loss, x, y, v)
    for backend in ("native", "torch.func"):
        assert_close(
            flat(hessext.hvp(model, loss, x, y, v, backend=backend)), ref, 1e-10, f"Huber at delta ({backend})"
        )
    assert_close(
        flat(hessext.hessian_diag(model, loss, x, y).values()),
        flat(hessext.hessian_diag(model, loss, x, y, backend="torch.func").values()),
        1e-10,
        "diagonal",
    )


@pytest.mark.parametrize("where", ["weight", "bias"])
def test_nan_parameter_in_a_relu_net_propagates(where):
    """A NaN weight or bias: torch's products are all NaN; the native ReLU masked it (finite results)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        getattr(model[0], where)[0] = float("nan")
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    v = [torch.randn_like(p) for p in model.parameters()]
    ref = autograd_hvp(model, F.mse_loss, x, y, v)
    got = flat(hessext.hvp(model, F.mse_loss, x, y, v, backend="native"))
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), "NaN pattern differs from torch"
    assert torch.isnan(flat(hessext.hessian_diag(model, F.mse_loss, x, y).values())).any()
    assert torch.isnan(hessext.hessian(model, F.mse_loss, x, y, output="matrix")).any()


@pytest.mark.parametrize(
    "dtype,z",
    [(torch.float32, 1e9), (torch.float32, -1e9), (torch.float64, 1e76), (torch.float64, -1e76), (torch.float32, 3e12)],
)
def test_gelu_tanh_derivatives_do_not_overflow(dtype, z):
    """GELU(approximate='tanh') at huge pre-activations: tanh saturates and torch's derivatives are
    finite (0 for the second); the table's formula multiplied 0 by an overflowed z^5."""
    model = nn.Sequential(nn.Linear(1, 1), nn.GELU(approximate="tanh"), nn.Linear(1, 1)).to(dtype)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    x = torch.tensor([[z], [0.5]], dtype=dtype)
    y = torch.zeros(2, 1, dtype=dtype)
    got = hessext.hessian_diag(model.double() if dtype == torch.float64 else model, F.mse_loss, x, y)
    assert all(torch.isfinite(t).all() for t in got.values()), got
    v = [torch.ones_like(p) for p in model.parameters()]
    hv = hessext.hvp(model, F.mse_loss, x, y, v, backend="native")
    ref = hessext.hvp(model, F.mse_loss, x, y, v, backend="torch.func")
    assert_close(flat(hv).double(), flat(ref).double(), 1e-5, "GELU-tanh HVP at a saturated unit")


def test_native_backend_raises_wherever_the_call_leaves_the_kernels():
    """backend='native' never runs torch.func silently: classes in dim 1 of a [N, C, T] output, and
    inputs holding NaN, both leave the kernels for this call."""
    torch.manual_seed(0)

    model = nn.Sequential(nn.Linear(4, 3)).double()  # [N, T, d] -> [N, T, 3]: torch reads classes from dim 1 (T)
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randint(0, 6, (5, 3))
    v = [torch.randn_like(p) for p in model.parameters()]
    loss = nn.CrossEntropyLoss()
    assert hessext.plan(model, loss).backend == "native"
    with pytest.raises(ValueError, match="backend='native' is not possible for this call: cross-entropy"):
        hessext.hvp(model, loss, x, y, v, backend="native")
    assert_close(flat(hessext.hvp(model, loss, x, y, v)), autograd_hvp(model, loss, x, y, v), 1e-10, "auto")
    mlp = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    xn = torch.randn(4, 2, dtype=torch.float64)
    xn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        hessext.hvp(
            mlp,
            F.mse_loss,
            xn,
            torch.randn(4, 1, dtype=torch.float64),
            [torch.randn_like(p) for p in mlp.parameters()],
            backend="native",
        )
