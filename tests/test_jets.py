"""value_gradient_laplacian and laplacian(dims=...): values, and gradients through them in the weights,
biases and inputs, against torch.func (vmap of jacrev and of jacfwd(jacrev) per sample, differentiated
by autograd), float64 to 1e-10 relative to the largest reference entry (float32 to 1e-4), on random
stacks with every activation the kernels serve, subsets of the input features, several outputs,
bias on and off, N = 1 and more; on torch.func's path for other models, and for models that couple
samples; torch.autograd.gradcheck on a small case."""

import random

import pytest
import torch
import torch.nn as nn
from torch.func import jacfwd, jacrev, vmap

import hessext
from cases import ACTIVATIONS, assert_close


def stack(rng, act, dtype=torch.float64):
    widths = (
        [rng.randint(1, 4)]
        + [rng.choice([1, rng.randint(2, 9)]) for _ in range(rng.randint(1, 3))]
        + [rng.randint(1, 3)]
    )
    layers = []
    for j, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(i, o, bias=rng.random() < 0.7))
        if j < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype), widths


def reference(model, x, dims):
    """(u, grad u over dims, lap u over dims) by torch.func, per sample."""

    def f(xm):
        return model(xm[None])[0]

    G = vmap(jacrev(f))(x)  # [N, C, d]
    H = vmap(jacfwd(jacrev(f)))(x)  # [N, C, d, d]
    lap = sum(H[:, :, i, i] for i in dims)
    return model(x), G[:, :, dims], lap


def loss_of(u, g, lap):
    return (u**2).sum() + (g.sin()).sum() + (lap**3).sum()


@pytest.mark.parametrize("case", range(18))
def test_values_and_gradients_against_torch_func(case):
    rng = random.Random(case)
    act = ACTIVATIONS[case % len(ACTIVATIONS)]
    torch.manual_seed(case)
    model, widths = stack(rng, act)
    N = rng.choice([1, 5])
    d = widths[0]
    dims = None if case % 3 == 0 else sorted(rng.sample(range(d), rng.randint(1, d)))
    x = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    params = list(model.parameters())
    assert hessext.plan(model, nn.MSELoss()).backend == "native"
    got = hessext.value_gradient_laplacian(model, x, dims=dims)
    ref = reference(model, x, dims if dims is not None else list(range(d)))
    for a, b, what in zip(got, ref, ("u", "grad u", "lap u")):
        assert a.shape == b.shape, what
        assert_close(a.detach(), b.detach(), 1e-10, f"{what} (case {case})", 1e-30)
    assert_close(hessext.laplacian(model, x, dims=dims).detach(), ref[2].detach(), 1e-10, "laplacian(dims)", 1e-30)
    grads = torch.autograd.grad(loss_of(*got), params + [x], allow_unused=True)
    want = torch.autograd.grad(loss_of(*ref), params + [x], allow_unused=True)
    flat = lambda gs, ps: torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, ps)])  # noqa: E731
    assert_close(flat(grads, params + [x]), flat(want, params + [x]), 1e-10, f"gradients (case {case})", 1e-30)


def test_float32_and_no_graph_without_grad():
    torch.manual_seed(0)
    model, _ = stack(random.Random(3), nn.Tanh, torch.float32)
    d = model[0].in_features
    x = torch.randn(6, d)
    with torch.no_grad():
        u, g, lap = hessext.value_gradient_laplacian(model, x)
    assert not (u.requires_grad or g.requires_grad or lap.requires_grad)
    ref = reference(model.double(), x.double(), list(range(d)))
    for a, b in zip((u, g, lap), ref):
        assert_close(a.double(), b.detach(), 1e-4, "float32", 1e-6)


@pytest.mark.parametrize("dims", [None, [1]])
def test_row_blocks_per_thread(dims, threads):
    """Without a graph the CPU kernels run each thread's block of samples on its own (csrc/cpu/jets.cpp):
    N = 601 over 1, 2 and 3 threads (uneven blocks) gives the torch.func values, in float64 (1e-10
    relative) and float32 (1e-4), for the Laplacian and the value-gradient-Laplacian triple."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 48), nn.Tanh(), nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 2)).double()
    x = torch.randn(601, 3, dtype=torch.float64)
    ref = reference(model, x, dims or [0, 1, 2])
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        m, xd = model.to(dtype), x.to(dtype)
        for nt in (1, 2, 3):
            threads(nt)
            with torch.no_grad():
                lap = hessext.laplacian(m, xd, dims=dims, backend="native")
                triple = hessext.value_gradient_laplacian(m, xd, dims=dims, backend="native")
            what = f"{dtype}, {nt} threads, dims={dims}"
            assert lap.shape == (601, 2), what
            assert_close(lap.double(), ref[2], rtol, what)
            for a, b in zip(triple, ref):
                assert_close(a.double(), b.detach(), rtol, what + ", triple")
        model.double()


def test_gradcheck():
    """In the inputs and in a weight passed through params= (the others frozen in the module)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    W = model[0].weight.detach().clone().requires_grad_()
    torch.autograd.gradcheck(
        lambda x, W: hessext.value_gradient_laplacian(model, x, dims=[1], params={"0.weight": W}), (x, W)
    )


class Centred(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.b(nn.functional.softsign(self.a(x - x.mean(0))))


@pytest.mark.parametrize(
    "model_fn",
    [lambda: nn.Sequential(nn.Linear(3, 6), nn.Softsign(), nn.Linear(6, 2)), Centred],
    ids=["softsign", "coupled"],
)
def test_torch_func_path(model_fn):
    torch.manual_seed(0)
    model = model_fn().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    dims = [0, 2]
    got = hessext.value_gradient_laplacian(model, x, dims=dims)
    J = jacrev(model)(x)  # [N, C, N, d]
    H = jacfwd(jacrev(model))(x)  # [N, C, N, d, N, d]
    N = x.shape[0]
    grad = torch.stack([J[n, :, n][:, dims] for n in range(N)])
    lap = torch.stack([sum(H[n, :, n, i, n, i] for i in dims) for n in range(N)])
    for a, b, what in zip(got, (model(x), grad, lap), ("u", "grad u", "lap u")):
        assert_close(a.detach(), b.detach(), 1e-10, what)


def test_dims_are_checked():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    for dims, error, text in (
        (5, TypeError, "list of input feature indices"),
        ([], TypeError, "non-empty"),
        ([0, 3], ValueError, "index the 3 input features"),
        ([1, -2], ValueError, "repeat"),
        ([0.5], TypeError, "int feature indices"),
    ):
        with pytest.raises(error, match=text):
            hessext.laplacian(model, x, dims=dims)
    # on the CPU the kernels serve dims and gradients (backend="native" holds); elsewhere torch ops do
    xg = x.clone().requires_grad_()
    assert_close(
        hessext.laplacian(model, xg, dims=[0], backend="native").detach(),
        hessext.laplacian(model, x, dims=[0], backend="torch.func"),
        1e-12,
        "native dims",
    )
