"""hessext under torch.compile: every public call traces with fullgraph=True (one op each) and equals
the eager call (float64, 1e-12 relative), on the native path and on torch.func's; a torch.compile'd model
passed to hessext is differentiated through the module it wraps, without recompiling or printing; a call that would need
a gradient under compile raises (fullgraph) or runs eagerly with its gradient (graph break)."""

import contextlib
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hessext
from cases import assert_close


def flat(obj):
    if isinstance(obj, dict):
        return torch.cat([flat(v) for v in obj.values()])
    if isinstance(obj, (list, tuple)):
        return torch.cat([flat(v) for v in obj])
    return obj.reshape(-1)


@pytest.fixture(autouse=True)
def strict_aliasing():
    """An op whose outputs alias its inputs or each other is an error (torch's default under CI)."""
    with torch._functorch.config.patch(error_on_custom_op_aliasing=True):
        yield


@pytest.fixture(scope="module", params=[nn.Tanh, nn.Softsign], ids=["native", "torch.func"])
def problem(request):
    torch.manual_seed(0)
    act = request.param
    model = nn.Sequential(nn.Linear(3, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 2)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    return model, x, y


def every_call(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    v = [torch.ones_like(p) for p in model.parameters()]
    P = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        input_derivatives = (
            hessext.input_hessian(model, F.mse_loss, x, y),
            hessext.input_hessian(model, F.mse_loss, x, y, diagonal=True),
            hessext.laplacian(model, x),
            hessext.laplacian(model, x, dims=[0, 2]),
            hessext.value_gradient_laplacian(model, x, dims=[1]),
        )
    return (
        hessext.hvp(model, F.mse_loss, x, y, v),
        hessext.hvp(model, F.mse_loss, x, y, torch.ones(3, P, dtype=x.dtype)),
        hessext.ggn_vp(model, F.mse_loss, x, y, dict(zip(names, v))),
        hessext.hessian_diag(model, F.mse_loss, x, y),
        hessext.ggn_diag(model, F.mse_loss, x, y, per_sample=isinstance(model[1], nn.Tanh)),  # native only
        hessext.hessian(model, F.mse_loss, x, y, output="matrix"),
        hessext.hessian(model, F.mse_loss, x, y),
        hessext.hessian(model, F.mse_loss, x, y, blocks="layer"),
        hessext.hvp(model, F.mse_loss, x, y, {"4.weight": v[4]}, params={"4.weight": model[4].weight}),
    ) + input_derivatives


def test_every_call_compiles_with_fullgraph(problem):
    model, x, y = problem
    compiled = torch.compile(lambda x, y: every_call(model, x, y), fullgraph=True)
    got, ref = compiled(x, y), every_call(model, x, y)
    assert len(got) == len(ref)
    for j, (a, b) in enumerate(zip(got, ref)):
        assert type(a) is type(b), j
        if isinstance(a, dict):
            assert list(a) == list(b), j
        assert_close(flat(a).detach(), flat(b).detach(), 1e-12, f"result {j}")


def test_a_compiled_model_passed_to_hessext(problem):
    model, x, y = problem
    compiled_model = torch.compile(model)
    v = [torch.randn_like(p) for p in model.parameters()]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        for n in range(3, 12):  # new batch sizes: a traced model would recompile each time
            got = hessext.hvp(compiled_model, F.mse_loss, x[:n], y[:n], v)
            assert_close(flat(got), flat(hessext.hvp(model, F.mse_loss, x[:n], y[:n], v)), 1e-12, f"N={n}")
    assert err.getvalue() == ""
    assert hessext.plan(compiled_model, F.mse_loss).backend == hessext.plan(model, F.mse_loss).backend


def test_a_result_that_needs_a_gradient(problem):
    model, x, y = problem
    with pytest.raises(Exception, match="carry a gradient, which hessext's op under torch.compile cannot"):
        torch.compile(lambda x: hessext.laplacian(model, x), fullgraph=True)(x)
    with pytest.raises(Exception, match="create_graph=True needs eager mode"):
        torch.compile(
            lambda x: hessext.hvp(
                model, F.mse_loss, x, y, [torch.ones_like(p) for p in model.parameters()], create_graph=True
            ),
            fullgraph=True,
        )(x)
    u, g, lap = torch.compile(lambda x: hessext.value_gradient_laplacian(model, x, dims=[0]))(x)
    ref = hessext.value_gradient_laplacian(model, x, dims=[0])
    assert_close(
        torch.autograd.grad((g**2).sum(), model[0].weight)[0],
        torch.autograd.grad((ref[1] ** 2).sum(), model[0].weight)[0],
        1e-12,
        "through a compiled gradient",
    )
    lap = torch.compile(lambda x: hessext.laplacian(model, x))(x)  # a graph break: eager, with its gradient
    g = torch.autograd.grad(lap.sum(), model[0].weight)[0]
    ref = torch.autograd.grad(hessext.laplacian(model, x).sum(), model[0].weight)[0]
    assert_close(g, ref, 1e-12, "gradient through a compiled Laplacian")


def test_a_loss_built_inside_the_compiled_function(problem):
    """nn.MSELoss() built per call inside the compiled function: a graph break that runs the call
    eagerly (fullgraph=True refuses with the reason)."""
    model, x, y = problem
    v = [torch.ones_like(p) for p in model.parameters()]
    got = torch.compile(lambda x: hessext.hvp(model, nn.MSELoss(), x, y, v))(x)
    assert_close(flat(got), flat(hessext.hvp(model, nn.MSELoss(), x, y, v)), 1e-12, "loss built inside")
    with pytest.raises(Exception, match="built inside the compiled function"):
        torch.compile(lambda x: hessext.hvp(model, nn.MSELoss(), x, y, v), fullgraph=True)(x)
