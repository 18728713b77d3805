"""The native path never silently differs from torch for the model as it is at this call.

Each test changes a model or loss after (or before) a first call, or gives input the kernels cannot
serve as torch would, and compares hessext with plain torch autograd on the model as it is now
(double backward, float64). Tolerance: 1e-10 relative to the largest reference entry."""

import gc
import sys
import threading
import types
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad

import hessext
from cases import TinyTanhModel, assert_close, tiny_tanh_loss

RTOL = 1e-10


def torch_hvp(model, loss_fn, x, y, v):
    """What torch computes for the model as it is: autograd double backward, hooks and all."""
    params = list(model.parameters())
    with torch.enable_grad():
        g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        hv = torch.autograd.grad(g, params, grad_outputs=v, allow_unused=True)
    return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params)])


def vectors(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]


def check_now(model, loss_fn, x, y, what):
    """hessext.hvp (auto) equals torch's HVP of the model as it is now."""
    v = vectors(model)
    got = torch.cat([t.reshape(-1) for t in hessext.hvp(model, loss_fn, x, y, v)])
    assert_close(got, torch_hvp(model, loss_fn, x, y, v), RTOL, what)


def mlp(*widths, act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    layers = []
    for j, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(i, o))
        if j < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def batch(d, c, n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, c, generator=g, dtype=torch.float64))


class Switch(nn.Module):
    """forward branches on a plain attribute."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 4), nn.Linear(4, 1)
        self.use_tanh = True

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h) if self.use_tanh else h)


# ---- 1. stale plans ---------------------------------------------------------------------------------


def _swap_activation(m, act):
    m[1] = act


def _swap_linear(m):
    torch.manual_seed(9)
    m[2] = nn.Linear(4, 1).double()


def _remove_bias(m):
    m[0].bias = None


def _change_widths(m):
    torch.manual_seed(9)
    m[0], m[2] = nn.Linear(2, 5).double(), nn.Linear(5, 1).double()


def _append(m):
    m.append(nn.Tanh())
    m.append(nn.Linear(1, 1).double())


@pytest.mark.parametrize(
    "change",
    [
        lambda m: _swap_activation(m, nn.ReLU()),
        lambda m: _swap_activation(m, nn.Identity()),
        _swap_linear,
        _remove_bias,
        _change_widths,
        _append,
        lambda m: setattr(m, "forward", types.MethodType(lambda self, x: 2 * nn.Sequential.forward(self, x), m)),
        lambda m: m[2].weight.data.mul_(3.0),
    ],
    ids=["relu", "identity", "new-linear", "remove-bias", "widths", "append", "patched-forward", "weights-in-place"],
)
def test_changed_model_is_recaptured(change):
    model = mlp(2, 4, 1)
    x, y = batch(2, 1)
    loss = nn.MSELoss()
    check_now(model, loss, x, y, "before")
    change(model)
    check_now(model, loss, x, y, "after the change")
    check_now(model, loss, x, y, "the call after")


def test_attribute_that_forward_reads():
    model = Switch().double()
    x, y = batch(2, 1)
    check_now(model, F.mse_loss, x, y, "tanh")
    model.use_tanh = False
    check_now(model, F.mse_loss, x, y, "no tanh")
    assert hessext.plan(model, F.mse_loss).spec[0] == [0]


def test_class_forward_patched():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 1)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Net().double()
    x, y = batch(2, 1)
    check_now(model, F.mse_loss, x, y, "before")
    Net.forward = lambda self, x: self.b(self.a(x)) * 3
    check_now(model, F.mse_loss, x, y, "class forward patched")


# ---- 2. hooks -----------------------------------------------------------------------------------------


def _double_output(module, args, output):
    return output * 2


def _shift_input(module, args):
    return (args[0] + 1,) + tuple(args[1:])


@pytest.mark.parametrize("where", ["layer", "model", "loss"])
@pytest.mark.parametrize("kind", ["forward", "pre"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_hooks_go_to_torch(where, kind, when):
    model, loss = mlp(2, 4, 1), nn.MSELoss()
    x, y = batch(2, 1)
    target = {"layer": model[1], "model": model, "loss": loss}[where]

    def add():
        if kind == "forward":
            return target.register_forward_hook(_double_output)
        return target.register_forward_pre_hook(_shift_input)

    handle = add() if when == "before" else None
    check_now(model, loss, x, y, "first call")
    if handle is None:
        handle = add()
        check_now(model, loss, x, y, "hook added")
    plan = hessext.plan(model, loss)
    assert plan.backend == "torch.func" and "hook" in plan.reason, plan.reason
    handle.remove()
    check_now(model, loss, x, y, "hook removed")
    assert hessext.plan(model, loss).backend == "native"


def test_global_hook_goes_to_torch():
    model, loss = mlp(2, 4, 1), nn.MSELoss()
    x, y = batch(2, 1)
    check_now(model, loss, x, y, "no hook")
    handle = torch.nn.modules.module.register_module_forward_hook(_double_output)
    try:
        check_now(model, loss, x, y, "global hook")
        assert "global" in hessext.plan(model, loss).reason
    finally:
        handle.remove()


# ---- 3. loss subclasses -------------------------------------------------------------------------------


class TenMSE(nn.MSELoss):
    def forward(self, input, target):
        return 10 * super().forward(input, target)


class HuberLike(nn.MSELoss):
    def forward(self, input, target):
        r = (input - target).abs()
        return torch.where(r < 1, 0.5 * r**2, r - 0.5).mean()


class PlainSubclass(nn.MSELoss):
    pass


@pytest.mark.parametrize(
    "loss,native",
    [(TenMSE(), True), (HuberLike(), False), (PlainSubclass(), True)],
    ids=["ten-times", "huber-like", "plain"],
)
def test_loss_subclass_is_what_it_computes(loss, native):
    model = mlp(2, 4, 1)
    x, y = batch(2, 1)
    y = y * 3  # residuals beyond 1, where Huber differs from MSE
    check_now(model, loss, x, y, type(loss).__name__)
    assert (hessext.plan(model, loss).backend == "native") == native


def test_loss_settings_changed():
    model, loss = mlp(2, 4, 1), nn.MSELoss()
    x, y = batch(2, 1)
    check_now(model, loss, x, y, "mean")
    loss.reduction = "sum"
    check_now(model, loss, x, y, "sum")


def test_same_loss_object_changed_between_calls():
    """The plan cache recognises the last loss object without recomputing its key; every change to it
    still shows: its settings, a class weight replaced, a hook, a subclass swapped in."""
    model = mlp(2, 4, 3)
    x = batch(2, 3)[0]
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    loss = nn.CrossEntropyLoss()
    check_now(model, loss, x, y, "plain")
    loss.label_smoothing = 0.3
    check_now(model, loss, x, y, "label smoothing")
    assert hessext.plan(model, loss).backend == "native"
    loss.weight = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    check_now(model, loss, x, y, "class weight")
    assert hessext.plan(model, loss).backend == "torch.func"
    loss.weight = None
    check_now(model, loss, x, y, "no weight again")
    assert hessext.plan(model, loss).backend == "native"
    handle = loss.register_forward_hook(lambda m, i, o: o * 2)
    check_now(model, loss, x, y, "hook doubling the loss")
    assert hessext.plan(model, loss).backend == "torch.func"
    handle.remove()
    check_now(model, loss, x, y, "hook removed")
    loss.__class__ = type("Doubled", (nn.CrossEntropyLoss,), {"forward": lambda self, a, b: 2 * F.cross_entropy(a, b)})
    check_now(model, loss, x, y, "class swapped")


# ---- 4. dropout ---------------------------------------------------------------------------------------


def dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1)).double()


def test_dropout_follows_train_and_eval():
    model = dropout_model().eval()
    x, y = batch(2, 1)
    check_now(model, F.mse_loss, x, y, "eval")
    assert hessext.plan(model, F.mse_loss).backend == "native"
    model.train()
    plan = hessext.plan(model, F.mse_loss)
    assert plan.backend == "torch.func" and "Dropout" in plan.reason, plan.reason
    v = vectors(model)
    torch.manual_seed(5)
    got = torch.cat([t.reshape(-1) for t in hessext.hvp(model, F.mse_loss, x, y, v)])
    torch.manual_seed(5)
    assert_close(got, torch_hvp(model, F.mse_loss, x, y, v), RTOL, "train, same dropout mask")
    model.eval()
    assert hessext.plan(model, F.mse_loss).backend == "native"
    check_now(model, F.mse_loss, x, y, "eval again")


def test_dropout_first_called_in_train_mode():
    model = dropout_model().train()
    assert hessext.plan(model, F.mse_loss).backend == "torch.func"
    model.eval()
    assert hessext.plan(model, F.mse_loss).backend == "native"


# ---- 5. tied weights ----------------------------------------------------------------------------------


def test_tied_weights():
    model = mlp(3, 3, 3)
    x, y = batch(3, 3)
    check_now(model, F.mse_loss, x, y, "untied")
    model[2].weight = model[0].weight
    check_now(model, F.mse_loss, x, y, "tied")
    assert "tied" in hessext.plan(model, F.mse_loss).reason
    assert set(hessext.hessian_diag(model, F.mse_loss, x, y)) == {n for n, _ in model.named_parameters()}


# ---- 6. the cache keeps no model alive -----------------------------------------------------------------


@pytest.mark.parametrize("loss", ["module", "closure-over-model", "patched-forward"])
def test_models_are_freed(loss):
    refs = []
    for _ in range(5):
        model = mlp(2, 4, 1)
        fn = (
            nn.MSELoss()
            if loss != "closure-over-model"
            else (lambda o, t, m=model: F.mse_loss(o, t) + 0 * sum(p.sum() for p in m.parameters()))
        )
        if loss == "patched-forward":
            model.forward = types.MethodType(nn.Sequential.forward, model)
        x, y = batch(2, 1)
        hessext.hvp(model, fn, x, y, vectors(model))
        hessext.hessian_diag(model, fn, x, y)
        refs.append(weakref.ref(model))
        del model, fn
    gc.collect()
    assert all(r() is None for r in refs), "a model passed to hessext was kept alive"


# ---- 7. capture in one thread, plain forward passes in another ------------------------------------------


def test_capture_does_not_disturb_other_threads():
    other = Switch().double()
    x = torch.randn(4, 2, dtype=torch.float64)
    errors, done = [], threading.Event()

    def forwards():
        while not done.is_set():
            try:
                other(x)
            except Exception as exc:  # noqa: BLE001 - any failure here is the defect
                errors.append(repr(exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads finely
    thread = threading.Thread(target=forwards)
    thread.start()
    try:
        for j in range(300):
            hessext.plan(TinyTanhModel().double(), tiny_tanh_loss)
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert not errors, f"{len(errors)} forward passes failed in the other thread, e.g. {errors[0]}"


# ---- 8. half precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_goes_to_torch(dtype):
    model = mlp(2, 4, 1)
    x, y = batch(2, 1)
    check_now(model, F.mse_loss, x, y, "float64")
    model.to(dtype)
    plan = hessext.plan(model, F.mse_loss)
    assert plan.backend == "torch.func" and "float32 and float64" in plan.reason, plan.reason
    v = [t.to(dtype) for t in vectors(model)]
    got = hessext.hvp(model, F.mse_loss, x.to(dtype), y.to(dtype), v)
    ref = torch_hvp(model, F.mse_loss, x.to(dtype), y.to(dtype), v)
    assert torch.equal(torch.cat([t.reshape(-1) for t in got]), ref)


# ---- 9. per-sample input derivatives need samples -------------------------------------------------------


def test_input_hessian_needs_a_batch_dimension():
    model = mlp(3, 4, 1)
    x, y = batch(3, 1)
    with pytest.raises(ValueError, match=r"inputs with a batch dimension \[N, \*features\], got shape \(3,\)"):
        hessext.input_hessian(model, F.mse_loss, x[0], y[0])
    with pytest.raises(ValueError, match=r"laplacian needs inputs with a batch dimension"):
        hessext.laplacian(model, x[0])


class Regroup(nn.Module):
    """Each row of the Linear stack holds two samples' features."""

    def __init__(self):
        super().__init__()
        self.net = mlp(2, 4, 1)

    def forward(self, x):
        return self.net(x.reshape(-1, 2))


def test_regrouped_rows_match_torch():
    """Kernel rows that hold two samples each: the per-sample input Hessians are the diagonal blocks
    of torch's [N, d, N, d]; the Laplacian, taken per sample and output row, is refused (no row per sample)."""
    model = Regroup()
    x, y = torch.randn(8, 1, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    assert hessext.plan(model, F.mse_loss).backend == "native"
    with torch.no_grad():
        got = hessext.input_hessian(model, F.mse_loss, x, y)
    H = torch.func.hessian(lambda xx: F.mse_loss(model(xx), y))(x)
    ref = torch.stack([H[n, :, n, :] for n in range(8)])
    assert got.shape == ref.shape == (8, 1, 1)
    assert_close(got, ref, RTOL, "regrouped input Hessian")
    with pytest.raises(ValueError, match="no row per sample"):
        hessext.laplacian(model, x)


# ---- 10. non-finite input --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["inputs", "targets"])
def test_non_finite_input_is_torchs(bad, where):
    model = mlp(2, 4, 4, 1)
    x, y = batch(2, 1)
    (x if where == "inputs" else y)[3, 0] = bad
    H = hessext.hessian(model, F.mse_loss, x, y, output="matrix")
    ref = hessext.hessian(model, F.mse_loss, x, y, output="matrix", backend="torch.func")
    assert torch.equal(H.isfinite(), ref.isfinite()), (
        f"{int(H.isfinite().sum())} finite, torch {int(ref.isfinite().sum())}"
    )
    assert torch.equal(H.isnan(), ref.isnan())
    for fn in (hessext.hessian_diag, hessext.ggn_diag):
        got, want = fn(model, F.mse_loss, x, y), fn(model, F.mse_loss, x, y, backend="torch.func")
        assert all(torch.equal(got[k].isnan(), want[k].isnan()) for k in got)


# ---- 11. differentiating through a result ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "torch.func"])
def test_grad_through_hvp(backend):
    model = mlp(2, 4, 1)
    x, y = batch(2, 1)
    params = {k: p.detach() for k, p in model.named_parameters()}
    v = dict(zip(params, vectors(model)))

    def through_hessext(p):
        out = hessext.hvp(model, F.mse_loss, x, y, v, params=p, backend=backend)
        return sum(t.sum() for t in out.values())

    def loss_of(p):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    def pure(p):  # d/dp sum(H(p) v), all in torch.func
        _, vjp_fn = torch.func.vjp(grad(loss_of), p)
        return sum(t.sum() for t in vjp_fn(v)[0].values())

    got, want = grad(through_hessext)(params), grad(pure)(params)
    assert_close(
        torch.cat([got[k].reshape(-1) for k in params]),
        torch.cat([want[k].reshape(-1) for k in params]),
        RTOL,
        "third derivative",
    )
    assert max(want[k].abs().max() for k in want) > 0


def test_grad_through_native_backend_is_refused():
    model = mlp(2, 4, 1)
    x, y = batch(2, 1)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def f(p):
        return hessext.hessian_diag(model, F.mse_loss, x, y, params=p, backend="native")["0.weight"].sum()

    with pytest.raises(ValueError, match="backend='native' cannot run under a torch.func transform"):
        grad(f)(params)


def test_vmap_over_hvp():
    model = mlp(2, 4, 1)
    x, y = batch(2, 1)
    V = torch.randn(5, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    got = torch.func.vmap(lambda v: hessext.hvp(model, F.mse_loss, x, y, v))(V)
    assert_close(got, hessext.hvp(model, F.mse_loss, x, y, V), RTOL, "vmap of hvp")


# ---- 13. float32 at large batches ---------------------------------------------------------------------


def test_float32_large_batch_accuracy():
    """[2,8,8,1], float32: the dense Hessian (N=2e5) and the diagonal (N=1e6) within 1e-5 of float64 in
    relative norm, like the float32 HVP (about 2e-5 at N=1e6)."""
    from cases import build_stack

    m64 = build_stack([2, 8, 8, 1], [True] * 3, ["tanh", "tanh"], torch.float64)
    m32 = build_stack([2, 8, 8, 1], [True] * 3, ["tanh", "tanh"], torch.float32)
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(10**6, 2, generator=g, dtype=torch.float64),
        torch.randn(10**6, 1, generator=g, dtype=torch.float64),
    )

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    def flat(d):
        return torch.cat([v.reshape(-1) for v in d.values()])

    d = rel(
        flat(hessext.hessian_diag(m32, F.mse_loss, x.float(), y.float())),
        flat(hessext.hessian_diag(m64, F.mse_loss, x, y)),
    )
    n = 2 * 10**5
    H = rel(
        hessext.hessian(m32, F.mse_loss, x[:n].float(), y[:n].float(), output="matrix"),
        hessext.hessian(m64, F.mse_loss, x[:n], y[:n], output="matrix"),
    )
    assert d < 1e-5 and H < 1e-5, f"diagonal {d:.2e}, dense Hessian {H:.2e}"


# ---- 15. smaller ------------------------------------------------------------------------------------------


def test_hutchinson_batch_must_be_positive():
    model = mlp(2, 3, 1)
    x, y = batch(2, 1)
    with pytest.raises(ValueError, match=r"batch must be a positive int \(vectors per product call\), got 0"):
        hessext.hutchinson_diag(model, F.mse_loss, x, y, batch=0)


def test_input_hessian_needs_targets():
    model = mlp(2, 3, 1)
    x, _ = batch(2, 1)
    with pytest.raises(TypeError, match="targets must be a torch.Tensor, got NoneType"):
        hessext.input_hessian(model, F.mse_loss, x, None)


def test_model_without_parameters():
    with pytest.raises(ValueError, match="model has no parameters"):
        hessext.hvp(nn.Sequential(nn.Tanh()), F.mse_loss, torch.randn(3, 2), torch.randn(3, 2), [])


def test_reason_uses_the_users_layer_names():
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3), nn.Softsign(), nn.Linear(3, 1))
    reason = hessext.plan(model, F.mse_loss).reason
    assert "Linear '2'" in reason and "_2" not in reason, reason


@pytest.mark.parametrize(
    "loss,factor",
    [
        (lambda o, t: 0.5 * torch.mean((o - t) ** 2), 0.5),
        (lambda o, t: ((o - t) ** 2).sum() / 2, 0.5),
        (lambda o, t: F.mse_loss(o, t) * 3, 3.0),
    ],
)
def test_scaled_mse_is_native(loss, factor):
    model = mlp(2, 4, 1)
    x, y = batch(2, 1)
    plan = hessext.plan(model, loss)
    assert plan.backend == "native" and plan.loss.factor == factor, plan.reason
    check_now(model, loss, x, y, "scaled MSE")


def test_new_loss_objects_per_call_reuse_the_capture(monkeypatch):
    import functools

    from hessext import capture

    model = mlp(2, 4, 1)
    x, y = batch(2, 1)
    captures = []
    real = capture.capture_loss
    monkeypatch.setattr(capture, "capture_loss", lambda fn: captures.append(fn) or real(fn))
    for j in range(5):
        hessext.hvp(model, lambda o, t: ((o - t) ** 2).mean(), x, y, vectors(model))
        hessext.hvp(model, functools.partial(F.mse_loss, reduction="sum"), x, y, vectors(model))
        hessext.hvp(model, nn.MSELoss(), x, y, vectors(model))
    assert len(captures) == 3, f"{len(captures)} captures for 3 distinct losses"
    scale = 2.0
    f = lambda o, t: scale * ((o - t) ** 2).mean()  # noqa: E731
    check_now(model, f, x, y, "global factor 2")
    scale = 5.0  # a closure value changed: a different loss, a new capture
    check_now(model, f, x, y, "global factor 5")


def test_per_call_check_cost_is_small():
    """The guard's cost per call (reported in the benchmark); here only that a hit does no capture."""
    model = TinyTanhModel().double()
    p = hessext.plan(model, tiny_tanh_loss)
    assert all(hessext.plan(model, tiny_tanh_loss) is p for _ in range(100))


@pytest.mark.parametrize("n", [7, 40000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finiteness_check_sees_every_entry(n, dtype):
    from hessext import _native

    check = _native.load().all_finite
    t = torch.randn(n, 3, dtype=dtype)
    # contiguous tensors: the loop in C++; strided ones: the max-abs reductions and one read-back
    assert check([t, torch.arange(5)]) and check([t.t(), t[:, 1]])  # integer and strided tensors too
    for bad in (float("nan"), float("inf"), float("-inf")):
        for j in (0, n // 2, n - 1):
            u = t.clone()
            u[j, 2] = bad
            assert not check([t, u]) and not check([u.t()]), (bad, j)
    huge = torch.full((n, 3), torch.finfo(dtype).max, dtype=dtype)
    assert check([huge]) and check([huge.t()])  # a sum would overflow; every entry is finite


# ---- the per-call checks in C agree with their Python definitions -----------------------------------

GUARD_SCALE = 1.0


class Guarded(nn.Module):
    """Reads a module global and carries attributes of every kind the guard compares."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 1)
        self.one = torch.tensor(1.0)
        self.big = torch.ones(3)
        self.flag = 3

    def forward(self, x):
        return GUARD_SCALE * self.b(torch.tanh(self.a(x)))


class Unequal:
    def __eq__(self, other):
        raise RuntimeError("cannot compare")


def _set_global(value):
    global GUARD_SCALE
    GUARD_SCALE = value


def _global_hook(m):
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    return handle.remove


GUARD_CHANGES = {  # name -> (change, returning None or its undo; whether the model still matches its capture)
    "nothing": (lambda m: None, True),
    "equal int": (lambda m: setattr(m, "flag", int("3")), True),
    "equal one-element tensor": (lambda m: setattr(m, "one", torch.tensor(1.0)), True),
    "other int": (lambda m: setattr(m, "flag", 4), False),
    "equal larger tensor": (lambda m: setattr(m, "big", torch.ones(3)), False),  # cannot compare as one bool
    "new attribute": (lambda m: setattr(m, "extra", 1), False),
    "object whose == raises": (lambda m: setattr(m, "flag", Unequal()), False),
    "swapped layer": (lambda m: setattr(m, "b", nn.Linear(3, 1).double()), False),
    "removed bias": (lambda m: setattr(m.a, "bias", None), False),
    "train/eval": (lambda m: m.train(False) and None, False),
    "forward hook": (lambda m: m.a.register_forward_hook(lambda *a: None).remove, False),
    "global hook": (_global_hook, False),
    "dtype": (lambda m: m.float() and None, False),
    "forward global": (lambda m: _set_global(2.0), False),
    "patched forward": (lambda m: setattr(m, "forward", lambda x: x), False),
}


@pytest.mark.parametrize("name", list(GUARD_CHANGES))
def test_guard_in_c_agrees_with_python(name):
    from hessext import _native, guard

    native = _native.load()
    model = Guarded().double()
    state = guard.ModelState(model)
    change, expected = GUARD_CHANGES[name]
    undo = change(model)
    try:
        try:
            python = state.read() == state.objects
        except Exception:  # noqa: BLE001 - as ModelState.matches: a comparison that fails is a change
            python = False
        c = native.state_matches(
            state.parts, model, state.params, guard._GLOBAL_HOOKS, state.fwd_globals, guard._MISSING, state.objects
        )
        assert python == expected and c == expected, f"{name}: Python says {python}, C says {c}"
        assert state.matches() == expected
    finally:
        _set_global(1.0)
        if callable(undo):
            undo()


def test_vector_items_accepts_only_what_the_checks_accept():
    from hessext import _native, inputs

    native = _native.load()
    model = mlp(2, 4, 1)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    good = [torch.randn(p.shape, dtype=torch.float64) for p in params]
    batched = [torch.randn((3,) + p.shape, dtype=torch.float64) for p in params]
    for vectors, K in (
        (good, 0),
        (tuple(good), 0),
        (dict(zip(names, good)), 0),
        (batched, 3),
        (dict(zip(names, batched)), 3),
    ):
        items, k = native.vector_items(vectors, names, params)
        assert k == K and all(a is b for a, b in zip(items, vectors.values() if isinstance(vectors, dict) else vectors))
    bad = [
        good[:-1],
        good + [good[0]],
        dict(zip(names[:-1], good)),
        {**dict(zip(names, good)), "x": good[0]},
        [good[0].float()] + good[1:],
        [good[0].t()] + good[1:],
        batched[:1] + good[1:],
        [batched[0]] + [b[:2] for b in batched[1:]],
        [good[0][None][:0]] + [b[:0] for b in batched[1:]],
        [1.0] + good[1:],
        {"w": good[0]},
        torch.cat([g.reshape(-1) for g in good]),
    ]
    for vectors in bad:
        assert native.vector_items(vectors, names, params) is None, vectors
    for vectors in bad[:-1]:  # the flat tensor is the Python path's own format
        with pytest.raises((ValueError, TypeError)):
            inputs.pack_vectors(vectors, names, params)
