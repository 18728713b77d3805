"""What the capture recognises as a native stack, and the reasons it gives when it does not."""

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hessext
from cases import TinyTanhModel, tiny_tanh_loss


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.b(self.a(x.flatten(1)).tanh())


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) + x)


@pytest.mark.parametrize(
    "model,loss_fn",
    [
        (TinyTanhModel(), tiny_tanh_loss),
        (nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)), nn.MSELoss()),
        (nn.Sequential(nn.Flatten(), nn.Linear(6, 3), nn.Linear(3, 2)), F.mse_loss),
        (Functional(), functools.partial(F.mse_loss, reduction="sum")),
        (nn.Linear(3, 2), lambda out, tgt: ((tgt - out) ** 2).sum()),
        (
            nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.0), nn.Linear(3, 1)),
            lambda o, t: F.mse_loss(o, t, reduction="sum"),
        ),
    ],
    ids=["tiny", "sequential", "flatten-input", "functional-tanh", "lone-linear", "dropout0-lambda"],
)
def test_native_models(model, loss_fn):
    plan = hessext.plan(model, loss_fn)
    assert plan.backend == "native", plan.reason
    assert plan.reason is None


@pytest.mark.parametrize(
    "model,loss_fn,reason",
    [
        (
            nn.Sequential(nn.Linear(2, 3), nn.Softsign(), nn.Linear(3, 1)),
            nn.MSELoss(),
            r"'softsign' after Linear '0' has no native kernel",
        ),
        (
            nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)),
            nn.CrossEntropyLoss(weight=torch.ones(2)),
            r"loss 'CrossEntropyLoss' uses a tensor .* a class weight",
        ),
        (nn.Sequential(nn.Linear(2, 3), nn.Tanh()), nn.MSELoss(), r"ends in an activation"),
        (Skip(), nn.MSELoss(), r"single chain"),
        (
            nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)),
            nn.MSELoss(reduction="none"),
            r"does not return a scalar",
        ),
        (
            nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)),
            lambda o, t: (o - t).abs().mean(),
            r"no native kernel \(native: MSE",
        ),
    ],
    ids=["softsign", "weighted-cross-entropy", "final-tanh", "skip", "reduction-none", "l1"],
)
def test_fallback_reasons(model, loss_fn, reason):
    plan = hessext.plan(model, loss_fn)
    assert plan.backend == "torch.func"
    assert plan.reason is not None
    import re

    assert re.search(reason, plan.reason), plan.reason


def test_plan_is_cached_per_model_and_loss():
    model, loss = TinyTanhModel(), nn.MSELoss()
    assert hessext.plan(model, loss) is hessext.plan(model, loss)
    assert hessext.plan(model, nn.MSELoss()) is hessext.plan(model, loss)  # built per call: no re-trace
    assert hessext.plan(model, nn.MSELoss(reduction="sum")) is not hessext.plan(model, loss)
    f = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731
    assert hessext.plan(model, f) is hessext.plan(model, f)


def test_the_table_codes_agree_with_the_kernels():
    """capture's activation and loss codes name the rows of csrc/activations.h and csrc/losses.h."""
    from hessext import _native, capture

    C = _native.load()
    if C is None:
        pytest.skip("native module unavailable")
    activations, losses = C.table_names()
    assert tuple(activations) == capture.ACTIVATION_ROWS
    assert tuple(losses) == capture.LOSS_ROWS
    assert [capture.TANH, capture.ELU, capture.HUBER, capture.SOFTMAX_CE] == [
        activations.index("tanh"),
        activations.index("elu"),
        losses.index("huber"),
        losses.index("softmax_cross_entropy"),
    ]
    assert [row.kind for row in capture._ACTIVATION_TABLE] == list(range(len(activations)))


@pytest.mark.parametrize(
    "act,kind",
    [
        (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
        (lambda x: F.gelu(x), "gelu"),
        (lambda x: F.gelu(x, approximate="bogus"), None),
        (lambda x: F.softplus(x, 2.0, 5.0), "softplus"),
        (lambda x: F.softplus(x, beta=0.0), None),
        (lambda x: F.leaky_relu(x, negative_slope=float("nan")), None),
        (lambda x: x.tanh(), "tanh"),
        (lambda x: torch.abs(x), None),
    ],
    ids=["gelu-tanh", "gelu", "gelu-bogus", "softplus", "softplus-beta-0", "leaky-nan", "method", "abs"],
)
def test_activation_table_recognition(act, kind):
    """Capture reads each activation call through the one table: the row its function, selector and
    parameters name, or no row (the fallback, with the reason)."""
    from hessext import capture

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 1)

        def forward(self, x):
            return self.b(act(self.a(x)))

    p = hessext.plan(Net(), nn.MSELoss())
    if kind is None:
        assert p.backend == "torch.func", p
    else:
        assert p.backend == "native", p.reason
        assert p.stack.activations[0].kind == capture.ACTIVATION_ROWS.index(kind)
