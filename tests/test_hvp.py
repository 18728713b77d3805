"""hessext.hvp against the float64 torch.func reference, closed forms and invariants."""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, hessian

import hessext
from cases import (
    DEVICES,
    DTYPES,
    RTOL,
    TinyTanhModel,
    assert_close,
    build_stack,
    random_batch,
    random_stack,
    reference_hessian,
    tiny_tanh_loss,
    log_softmax_classifier,
    to_flat,
)
from hessext import fallback


def reference_hvp(model, loss_fn, x, y, V):
    """float64 torch.func HVPs on the CPU: V [K, P] -> [K, P]."""
    m64 = build_like(model)
    x64 = (x.double() if x.is_floating_point() else x).cpu()
    y64 = (y.double() if y.is_floating_point() else y).cpu()
    params = {k: p.detach() for k, p in m64.named_parameters()}
    vecs, start = {}, 0
    for k, p in params.items():
        vecs[k] = V[:, start : start + p.numel()].double().reshape((V.shape[0],) + p.shape)
        start += p.numel()
    out = fallback.hvp(m64, loss_fn, x64, y64, params, vecs)
    return torch.cat([out[k].reshape(V.shape[0], -1) for k in params], 1)


def build_like(model):
    import copy

    return copy.deepcopy(model).to("cpu", torch.float64)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(12))
def test_random_stacks_match_reference(case, dtype, device, path):
    rng = random.Random(case)
    widths, biases, acts = random_stack(rng)
    model = build_stack(widths, biases, acts, dtype, device, seed=case)
    n = rng.choice([1, rng.randint(2, 300)])
    x, y = random_batch(widths[0], widths[-1], n, dtype, device, seed=case)
    loss_fn = nn.MSELoss(reduction=rng.choice(["mean", "sum"]))
    K = rng.choice([1, 3, 16])
    V = torch.randn(K, num_params(model), dtype=torch.float64, generator=torch.Generator().manual_seed(case))
    assert hessext.plan(model, loss_fn).backend == "native"
    got = hessext.hvp(model, loss_fn, x, y, V.to(dtype=dtype, device=device), backend="native")
    assert got.dtype == dtype and got.shape == (K, num_params(model))
    ref = reference_hvp(model, loss_fn, x, y, V)
    assert_close(got, ref, RTOL[dtype], f"{widths} bias={biases} acts={acts} N={n} K={K} {dtype} {path}")


def test_op_takes_one_vector_unbatched(path):
    """torch.ops.hessext.hvp/ggn_vp with [*shape] vectors give the [1, *shape] results without their K."""
    model = build_stack([3, 70, 5, 2], [True, False, True], [nn.Tanh, nn.Tanh])
    x, y = random_batch(3, 2, 40)
    ws = [model[0].weight, model[2].weight, model[4].weight]
    bs = [model[0].bias, None, model[4].bias]
    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (ws[0], bs[0], ws[1], ws[2], bs[2])]
    args = (x, y, ws, bs, [1, 1], [0.0] * 4, 0, 0.0, 1.0 / 80)
    for op in (torch.ops.hessext.hvp, torch.ops.hessext.ggn_vp):
        with torch.no_grad():
            one, batched = op(*args, vs), op(*args, [v.unsqueeze(0) for v in vs])
        for a, b, v in zip(one, batched, vs):
            assert a.shape == v.shape and torch.equal(a, b[0]), f"{op} {path}"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_linear_closed_form(bias, reduction):
    """H = c kron(I_C, Xa^T Xa) for one Linear + MSE, Xa = [X, 1] with a bias, c = 2/(N*C) or 2."""
    N, d, C = 37, 4, 3
    torch.manual_seed(0)
    model = nn.Linear(d, C, bias=bias).double()
    x, y = random_batch(d, C, N)
    Xa = torch.cat([x, torch.ones(N, 1, dtype=x.dtype)], 1) if bias else x
    c = 2.0 / (N * C) if reduction == "mean" else 2.0
    V = {"weight": torch.randn(5, C, d, dtype=torch.float64)}
    if bias:
        V["bias"] = torch.randn(5, C, dtype=torch.float64)
    got = hessext.hvp(model, nn.MSELoss(reduction=reduction), x, y, V, backend="native")
    Va = torch.cat([V["weight"], V["bias"].unsqueeze(-1)], -1) if bias else V["weight"]  # [K, C, d(+1)]
    expected = c * Va @ (Xa.T @ Xa)
    assert_close(got["weight"], expected[..., :d], 1e-12, "weight block")
    if bias:
        assert_close(got["bias"], expected[..., d], 1e-12, "bias block")


def test_tiny_tanh_as_written():
    """The 1-16-1 network's Model, loss and functional params dict, natively, against torch.func.hessian."""
    torch.manual_seed(0)
    net = TinyTanhModel().double()
    batch_size = 100
    targets = torch.randn(batch_size, dtype=torch.float64)
    inputs = torch.randn(batch_size, 1, dtype=torch.float64)
    params = dict(net.named_parameters())
    plan = hessext.plan(net, tiny_tanh_loss)
    assert plan.backend == "native", plan.reason

    def compute_loss(params, inputs, targets):
        return tiny_tanh_loss(functional_call(net, params, (inputs,)), targets)

    hess = hessian(compute_loss, argnums=0)(params, inputs, targets)
    P = num_params(net)
    names = list(params)
    H = torch.cat(
        [torch.cat([hess[a][b].reshape(params[a].numel(), params[b].numel()) for b in names], 1) for a in names], 0
    )
    V = torch.randn(4, P, dtype=torch.float64)
    got = hessext.hvp(net, tiny_tanh_loss, inputs, targets, V, params=params)
    assert_close(got, V @ H, 1e-12, "1-16-1 HVP vs torch.func.hessian")


def test_log_softmax_classifier_native_as_written():
    torch.manual_seed(0)
    model = log_softmax_classifier().double()
    plan = hessext.plan(model, nn.NLLLoss())
    assert plan.backend == "native", plan.reason
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    V = torch.randn(2, num_params(model), dtype=torch.float64)
    got = hessext.hvp(model, nn.NLLLoss(), x, y, V)
    params = {k: p.detach() for k, p in model.named_parameters()}
    f = lambda p: nn.NLLLoss()(functional_call(model, p, (x,)), y)  # noqa: E731
    hess = hessian(f)(params)
    names = list(params)
    H = torch.cat(
        [torch.cat([hess[a][b].reshape(params[a].numel(), params[b].numel()) for b in names], 1) for a in names], 0
    )
    assert_close(got, V @ H, 1e-12, "log-softmax classifier native HVP")
    assert_close(
        hessext.hvp(model, nn.NLLLoss(), x, y, V, backend="torch.func"),
        V @ H,
        1e-12,
        "log-softmax classifier fallback HVP",
    )


@pytest.mark.parametrize("loss_fn", [F.mse_loss, nn.MSELoss(), nn.MSELoss(reduction="sum")], ids=["F", "mean", "sum"])
def test_fallback_survives_mse_zero_tensor_trap(loss_fn):
    """torch.func.jvp(grad(f)) raises 'ZeroTensors are immutable' for F.mse_loss; the fallback must not."""
    model = build_stack([3, 5, 2], [True, True], ["tanh"])
    x, y = random_batch(3, 2, 7)
    V = torch.randn(3, num_params(model), dtype=torch.float64)
    a = hessext.hvp(model, loss_fn, x, y, V, backend="torch.func")
    b = hessext.hvp(model, loss_fn, x, y, V, backend="native")
    assert_close(b, a, 1e-12, "native vs fallback")


@pytest.mark.parametrize("fmt", ["dict", "list", "tuple", "flat"])
@pytest.mark.parametrize("K", [None, 1, 4])
def test_vector_formats(fmt, K):
    model = build_stack([4, 6, 6, 2], [True, False, True], ["tanh", "identity"])
    x, y = random_batch(4, 2, 11)
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    lead = () if K is None else (K,)
    parts = [torch.randn(lead + s, dtype=torch.float64) for s in shapes]
    vectors = {
        "dict": dict(zip(names, parts)),
        "list": parts,
        "tuple": tuple(parts),
        "flat": torch.cat([p.reshape(lead + (-1,)) for p in parts], -1),
    }[fmt]
    got = hessext.hvp(model, nn.MSELoss(), x, y, vectors)
    assert type(got) is type(vectors)
    if fmt == "dict":
        assert list(got) == names
    if fmt != "flat":
        assert [tuple(t.shape) for t in (got.values() if fmt == "dict" else got)] == [tuple(lead + s) for s in shapes]
    else:
        assert got.shape == vectors.shape
    Vflat = torch.cat([p.reshape(K or 1, -1) for p in parts], 1)
    ref = reference_hvp(model, nn.MSELoss(), x, y, Vflat)
    assert_close(to_flat(got, K is not None).reshape(K or 1, -1), ref, 1e-10, fmt)


def test_params_override_and_parameter_order():
    """params= is used instead of the module's own; a module that registers fc2 before fc1 works."""

    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(5, 2)
            self.fc1 = nn.Linear(3, 5, bias=False)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    model = Reordered().double()
    x, y = random_batch(3, 2, 9)
    params = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    V = torch.randn(2, num_params(model), dtype=torch.float64)
    native = hessext.hvp(model, F.mse_loss, x, y, V, params=params, backend="native")
    ref = hessext.hvp(model, F.mse_loss, x, y, V, params=params, backend="torch.func")
    assert_close(native, ref, 1e-10, "params override")
    own = hessext.hvp(model, F.mse_loss, x, y, V)
    assert (own - native).abs().max() > 1e-6


def test_leaves_no_grad_and_works_under_no_grad():
    model = build_stack([3, 4, 1], [True, True], ["tanh"])
    x, y = random_batch(3, 1, 5)
    v = [torch.randn_like(p) for p in model.parameters()]
    for backend in ("native", "torch.func"):
        out = hessext.hvp(model, nn.MSELoss(), x, y, v, backend=backend)
        assert all(p.grad is None for p in model.parameters())
        assert all(o.grad_fn is None and not o.requires_grad for o in out)
        with torch.no_grad():
            again = hessext.hvp(model, nn.MSELoss(), x, y, v, backend=backend)
        assert_close(torch.cat([a.reshape(-1) for a in again]), torch.cat([o.reshape(-1) for o in out]), 1e-12)
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = hessext.hvp(model, nn.MSELoss(), x, y, v)
    assert_close(torch.cat([a.reshape(-1) for a in frozen]), torch.cat([o.reshape(-1) for o in out]), 1e-12)


def test_non_contiguous_and_expanded_inputs():
    model = build_stack([4, 8, 3], [True, True], ["tanh"])
    base = torch.randn(4, 20, dtype=torch.float64)
    x = base.T[::2]  # [10, 4], non-contiguous
    y = torch.randn(3, dtype=torch.float64).expand(10, 3)  # expanded
    V = torch.randn(2, num_params(model), dtype=torch.float64)
    got = hessext.hvp(model, nn.MSELoss(), x, y, V)
    ref = reference_hvp(model, nn.MSELoss(), x.contiguous(), y.contiguous(), V)
    assert_close(got, ref, 1e-10, "strided inputs")


def test_leading_dimensions_and_shape_ops():
    """Inputs [B, T, d] (Linear acts on the last dim) and a flattened output."""
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2), nn.Flatten(0)).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    y = torch.randn(40, dtype=torch.float64)
    assert hessext.plan(model, F.mse_loss).backend == "native"
    V = torch.randn(3, num_params(model), dtype=torch.float64)
    got = hessext.hvp(model, F.mse_loss, x, y, V)
    ref = hessext.hvp(model, F.mse_loss, x, y, V, backend="torch.func")
    assert_close(got, ref, 1e-10, "leading dims")


def test_op_registration_and_fakes():
    """Each op's schema and fake (meta) implementation are consistent (torch.library.opcheck)."""
    model = build_stack([3, 4, 2], [True, False], ["tanh"])
    x, y = random_batch(3, 2, 5)
    W = [model[0].weight.detach(), model[2].weight.detach()]
    b = [model[0].bias.detach(), None]
    V = [
        torch.randn(2, 4, 3, dtype=torch.float64),
        torch.randn(2, 4, dtype=torch.float64),
        torch.randn(2, 2, 4, dtype=torch.float64),
    ]
    utils = ("test_schema", "test_faketensor")
    for op in (torch.ops.hessext.hvp.default, torch.ops.hessext.ggn_vp.default):
        torch.library.opcheck(op, (x, y, W, b, [1], [0.0, 0.0], 0, 0.0, 0.1, V), test_utils=utils)
    for ggn in (False, True):
        for per_sample in (False, True):
            torch.library.opcheck(
                torch.ops.hessext.diag.default,
                (x, y, W, b, [1], [0.0, 0.0], 0, 0.0, 0.1, ggn, per_sample),
                test_utils=utils,
            )


def test_op_under_torch_compile_fullgraph():
    """The op traces (through its fake) inside a compiled graph, and the public call compiles too."""
    model = build_stack([3, 4, 2], [True, True], ["tanh"])
    x, y = random_batch(3, 2, 5)
    assert hessext.ops.available()
    W = [model[0].weight.detach(), model[2].weight.detach()]
    b = [model[0].bias.detach(), model[2].bias.detach()]
    V = [torch.randn((2,) + p.shape, dtype=torch.float64) for p in model.parameters()]
    compiled = torch.compile(
        lambda V: [2 * t for t in torch.ops.hessext.hvp(x, y, W, b, [1], [0.0, 0.0], 0, 0.0, 0.1, V)], fullgraph=True
    )
    for got, want in zip(compiled(V), torch.ops.hessext.hvp(x, y, W, b, [1], [0.0, 0.0], 0, 0.0, 0.1, V)):
        assert_close(got, 2 * want, 1e-15, "compiled op")
    Vf = torch.randn(2, num_params(model), dtype=torch.float64)
    api = torch.compile(lambda V: hessext.hvp(model, nn.MSELoss(), x, y, V))
    assert_close(api(Vf), hessext.hvp(model, nn.MSELoss(), x, y, Vf), 1e-15, "compiled hessext.hvp")


@pytest.mark.parametrize("K", [1, 3, 20], ids=["one", "loop", "vmap"])
def test_fallback_routes_agree(K):
    """The fallback's double backward (live module or functional_call) and its vmapped vjp(grad) give
    torch.func's products, with frozen and unused parameters too (tolerance 1e-12)."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2))
            self.spare = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    model = Unused().double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    P = num_params(model)
    V = torch.randn(K, P, dtype=torch.float64)
    H = reference_hessian(model, nn.MSELoss(), x, y)
    assert_close(hessext.hvp(model, nn.MSELoss(), x, y, V), V @ H, 1e-12, "own parameters")
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    assert_close(hessext.hvp(model, nn.MSELoss(), x, y, V, params=params), V @ H, 1e-12, "params=")
    model.net[0].bias.requires_grad_(False)  # frozen: the products cover the others, as torch.optim trains them
    keep = torch.cat([torch.full((p.numel(),), p.requires_grad) for p in model.parameters()])
    Vk = V[:, keep]
    assert_close(hessext.hvp(model, nn.MSELoss(), x, y, Vk), Vk @ H[keep][:, keep], 1e-12, "a frozen parameter")
    assert all(p.grad is None for p in model.parameters())
