"""Results used inside a loss carry the right gradient, by one rule:

- input derivatives (laplacian, input_hessian) are values of the model: in grad mode, when a
  parameter, the inputs or the targets require grad, they are differentiable like the model output;
- derivatives with respect to the weights (hvp, ggn_vp, hessian_diag, ggn_diag, hessian) take
  torch.autograd.grad's create_graph: detached by default, differentiable with create_graph=True.

Each gradient is compared with plain autograd (create_graph=True, float64) on the same loss.
Tolerance: 1e-10 relative to the largest reference entry."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hessext
from cases import assert_close

RTOL = 1e-10


def mlp(widths=(2, 8, 8, 1), act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    layers = []
    for j, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(i, o)] + ([act()] if j < len(widths) - 2 else [])
    return nn.Sequential(*layers).double()


def flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def autograd_laplacian(model, x):
    """sum_i d^2 u / dx_i^2 per sample, by nested autograd with create_graph (the PINN way)."""
    x = x if x.requires_grad else x.detach().requires_grad_()
    u = model(x)
    lap = torch.zeros_like(u)
    for c in range(u.shape[1]):
        g = torch.autograd.grad(u[:, c].sum(), x, create_graph=True)[0]
        for i in range(x.shape[1]):
            lap[:, c] = lap[:, c] + torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i]
    return lap


@pytest.mark.parametrize("act", [nn.Tanh, nn.SiLU, nn.Softplus])
def test_pinn_loss_trains_through_the_laplacian(act):
    """The Poisson PINN loss mean((-lap u - f)^2) + mean(u(x_b)^2): its weight gradient with hessext's
    Laplacian equals autograd's (before: the PDE term's gradient was silently dropped)."""
    model = mlp((2, 16, 16, 1), act)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.rand(33, 2, generator=g, dtype=torch.float64)
    xb = torch.rand(9, 2, generator=g, dtype=torch.float64)
    f = torch.sin(x[:, :1])

    def pinn_loss(lap):
        return ((-lap - f) ** 2).mean() + (model(xb) ** 2).mean()

    got = flat_grad(pinn_loss(hessext.laplacian(model, x)), params)
    ref = flat_grad(pinn_loss(autograd_laplacian(model, x)), params)
    assert_close(got, ref, RTOL, "PINN weight gradient")
    lap = hessext.laplacian(model, x)
    assert lap.requires_grad


def test_laplacian_gradient_in_the_inputs_and_detached_without_grad():
    model = mlp((3, 6, 2)).requires_grad_(False)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad((hessext.laplacian(model, x) ** 2).sum(), x)[0]
    ref = torch.autograd.grad((autograd_laplacian(model, x) ** 2).sum(), x)[0]
    assert_close(got, ref, RTOL, "Laplacian gradient in the inputs")
    assert not hessext.laplacian(model, x.detach()).requires_grad  # nothing requires grad: native, detached
    with torch.no_grad():
        assert not hessext.laplacian(mlp((3, 6, 2)), x).requires_grad


def test_the_differentiated_laplacian_is_native_on_the_cpu():
    """backend="native" holds for a Laplacian that carries a gradient (the kernels' reverse pass is the
    op's autograd formula, hessext::output_jets); under no_grad nothing is recorded."""
    model = mlp((2, 5, 1))
    x = torch.randn(4, 2, dtype=torch.float64)
    lap = hessext.laplacian(model, x, backend="native")
    nodes, seen = [lap.grad_fn], []
    while nodes:
        node = nodes.pop()
        seen.append(type(node).__name__)
        nodes += [n for n, _ in node.next_functions if n is not None]
    assert any("outputjets" in name.lower().replace("_", "") for name in seen), seen
    ref = flat_grad((autograd_laplacian(model, x) ** 2).sum(), list(model.parameters()))
    assert_close(flat_grad((lap**2).sum(), list(model.parameters())), ref, RTOL, "native reverse pass")
    with torch.no_grad():
        assert hessext.laplacian(model, x, backend="native").grad_fn is None


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU])
def test_a_second_derivative_through_the_laplacian(act):
    """A Hessian-vector product of a PINN loss (double backward through the Laplacian's reverse pass)
    equals nested autograd's, in the weights and in the inputs."""
    model = mlp((2, 6, 6, 1), act)
    params = list(model.parameters())
    x = torch.rand(7, 2, dtype=torch.float64, requires_grad=True)
    v = [torch.randn_like(p) for p in params]

    def hvp(lap):
        loss = ((lap - x[:, :1]) ** 2).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        dot = sum((g * w).sum() for g, w in zip(grads, v) if g is not None)
        return flat_grad(dot, params + [x])  # the last bias does not reach the Laplacian: zeros

    assert_close(hvp(hessext.laplacian(model, x)), hvp(autograd_laplacian(model, x)), RTOL, "HVP of a PINN loss")


def test_input_hessian_in_a_loss():
    model = mlp((3, 7, 2))
    params = list(model.parameters())
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)

    def autograd_input_hessian():
        xx = x.clone().requires_grad_()
        g = torch.autograd.grad(F.mse_loss(model(xx), y), xx, create_graph=True)[0]
        return torch.stack([torch.autograd.grad(g[:, i].sum(), xx, create_graph=True)[0] for i in range(3)], 2)

    for diagonal in (False, True):
        got = hessext.input_hessian(model, F.mse_loss, x, y, diagonal=diagonal)
        ref = autograd_input_hessian()
        ref = torch.diagonal(ref, dim1=1, dim2=2) if diagonal else ref
        assert_close(
            flat_grad((got**2).sum(), params),
            flat_grad((ref**2).sum(), params),
            RTOL,
            f"input Hessian gradient (diagonal={diagonal})",
        )


def _hvp_penalty_reference(model, x, y, v):
    params = list(model.parameters())
    g = torch.autograd.grad(F.mse_loss(model(x), y), params, create_graph=True)
    hv = torch.autograd.grad(g, params, grad_outputs=v, create_graph=True)
    return sum((h**2).sum() for h in hv)


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_hvp_penalty_with_create_graph(act):
    """A Hessian penalty ||H v||^2: with create_graph=True its gradient is autograd's; by default the
    result is detached, like torch.autograd.grad."""
    model = mlp((3, 6, 2), act)
    params = list(model.parameters())
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    v = [torch.randn_like(p) for p in params]
    hv = hessext.hvp(model, F.mse_loss, x, y, v, create_graph=True)
    got = flat_grad(sum((h**2).sum() for h in hv), params)
    assert_close(got, flat_grad(_hvp_penalty_reference(model, x, y, v), params), RTOL, "HVP penalty gradient")
    assert not any(h.requires_grad for h in hessext.hvp(model, F.mse_loss, x, y, v))
    V = torch.randn(3, sum(p.numel() for p in params), dtype=torch.float64)  # K vectors, flat
    assert hessext.hvp(model, F.mse_loss, x, y, V, create_graph=True).requires_grad


def test_weight_quantities_with_create_graph_match_autograd():
    model = mlp((2, 4, 1))
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    P = sum(p.numel() for p in params)

    def autograd_hessian():
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.mse_loss(model(x), y), params, create_graph=True)])
        return torch.stack(
            [torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], params, create_graph=True)]) for i in range(P)]
        )

    H = autograd_hessian()
    ref = flat_grad((torch.diagonal(H) ** 3).sum(), params)
    diag = hessext.hessian_diag(model, F.mse_loss, x, y, create_graph=True)
    got = flat_grad(sum((diag[n] ** 3).sum() for n in names), params)
    assert_close(got, ref, RTOL, "Hessian diagonal gradient")
    Hm = hessext.hessian(model, F.mse_loss, x, y, output="matrix", create_graph=True)
    assert_close(flat_grad((Hm**2).sum(), params), flat_grad((H**2).sum(), params), RTOL, "Hessian gradient")
    v = torch.randn(P, dtype=torch.float64)
    gv = hessext.ggn_vp(model, F.mse_loss, x, y, v, create_graph=True)
    assert gv.requires_grad
    gd = hessext.ggn_diag(model, F.mse_loss, x, y, create_graph=True)
    assert all(t.requires_grad for t in gd.values())


def test_create_graph_is_checked_and_native_refuses_it():
    model = mlp((2, 4, 1))
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    v = [torch.randn_like(p) for p in model.parameters()]
    with pytest.raises(TypeError, match="create_graph must be True or False"):
        hessext.hvp(model, F.mse_loss, x, y, v, create_graph="yes")
    with pytest.raises(ValueError, match="create_graph=True"):
        hessext.hvp(model, F.mse_loss, x, y, v, create_graph=True, backend="native")
    with pytest.raises(ValueError, match="create_graph=True"):
        hessext.hessian_diag(model, F.mse_loss, x, y, create_graph=True, per_sample=True)


def test_ggn_products_with_create_graph_match_autograd():
    """G v = J^T (2 / (N C)) J v for the mean squared error, J the output's Jacobian in the weights
    built by autograd with create_graph: the gradient of ||G v||^2 in the weights agrees."""
    model = mlp((2, 4, 1))
    params = list(model.parameters())
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    v = [torch.randn_like(p) for p in params]
    out = model(x).reshape(-1)
    J = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i], params, create_graph=True)])
            for i in range(out.numel())
        ]
    )
    vf = torch.cat([t.reshape(-1) for t in v])
    ref = J.T @ (2.0 / out.numel() * (J @ vf))
    got = torch.cat([t.reshape(-1) for t in hessext.ggn_vp(model, F.mse_loss, x, y, v, create_graph=True)])
    assert_close(got.detach(), ref.detach(), RTOL, "GGN product")
    assert_close(flat_grad((got**2).sum(), params), flat_grad((ref**2).sum(), params), RTOL, "GGN product gradient")
    diag = hessext.ggn_diag(model, F.mse_loss, x, y, create_graph=True)
    dref = 2.0 / out.numel() * (J * J).sum(0)
    got_d = torch.cat([t.reshape(-1) for t in diag.values()])
    assert_close(flat_grad((got_d**2).sum(), params), flat_grad((dref**2).sum(), params), RTOL, "GGN diagonal gradient")
