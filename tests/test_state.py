"""A cached capture never outlives what it read: losses changed after their first use, forwards
that read state mutated in place, and concurrent calls sharing one plan. Each case calls hessext,
changes something, and compares the next call with plain autograd on the model and loss as they
are now (double backward, float64). Tolerance: 1e-10 relative to the largest reference entry."""

import sys
import threading
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hessext
from cases import assert_close

RTOL = 1e-10


def autograd_hvp(model, loss_fn, x, y, v):
    params = list(model.parameters())
    g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    hv = torch.autograd.grad(g, params, grad_outputs=v, allow_unused=True)
    return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params)])


def check(model, loss_fn, x, y, what):
    g = torch.Generator().manual_seed(7)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
    got = torch.cat([t.reshape(-1) for t in hessext.hvp(model, loss_fn, x, y, v)])
    assert_close(got, autograd_hvp(model, loss_fn, x, y, v), RTOL, what)


def classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def class_batch(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize(
    "change",
    [
        lambda loss: setattr(loss, "label_smoothing", 0.3),
        lambda loss: setattr(loss, "reduction", "sum"),
        lambda loss: setattr(loss, "ignore_index", 1),
        lambda loss: setattr(loss, "weight", torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)),
    ],
    ids=["label_smoothing", "reduction", "ignore_index", "weight"],
)
def test_cross_entropy_changed_after_first_use(change):
    model, (x, y) = classifier(), class_batch()
    loss = nn.CrossEntropyLoss()
    check(model, loss, x, y, "before")
    change(loss)
    check(model, loss, x, y, "after the change")


def test_bce_pos_weight_set_after_first_use():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.rand(9, 2, dtype=torch.float64)
    loss = nn.BCEWithLogitsLoss()
    check(model, loss, x, y, "before")
    loss.pos_weight = torch.tensor([3.0, 0.5], dtype=torch.float64)
    check(model, loss, x, y, "pos_weight")


class ScaledMSE(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = 1.0

    def forward(self, out, target):
        return self.scale * F.mse_loss(out, target)


class CallableLoss:
    def __init__(self):
        self.scale = 1.0

    def __call__(self, out, target):
        return self.scale * F.mse_loss(out, target)


class Trainer:
    def __init__(self):
        self.scale = 1.0

    def loss(self, out, target):
        return self.scale * F.mse_loss(out, target)


def _regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    return model, torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)


def test_losses_over_mutable_objects():
    """Custom loss modules, callable objects, stored bound methods and lambdas over a dict: a change
    of what they read is seen (relative errors 0.67-3.25 before)."""
    model, x, y = _regression()
    module, obj, trainer, cfg = ScaledMSE(), CallableLoss(), Trainer(), {"scale": 1.0}
    method = trainer.loss
    over_dict = lambda o, t: cfg["scale"] * F.mse_loss(o, t)  # noqa: E731
    for loss_fn, change in (
        (module, lambda: setattr(module, "scale", 3.0)),
        (obj, lambda: setattr(obj, "scale", 2.5)),
        (method, lambda: setattr(trainer, "scale", 0.5)),
        (over_dict, lambda: cfg.update(scale=4.0)),
    ):
        check(model, loss_fn, x, y, f"{type(loss_fn).__name__} before")
        change()
        check(model, loss_fn, x, y, f"{type(loss_fn).__name__} after")


def test_a_fresh_cross_entropy_per_call_hits_the_cache(monkeypatch):
    from hessext import capture

    model, (x, y) = classifier(), class_batch()
    check(model, nn.CrossEntropyLoss(), x, y, "first")
    captures = []
    real = capture.capture_loss
    monkeypatch.setattr(capture, "capture_loss", lambda fn: captures.append(fn) or real(fn))
    for _ in range(3):
        check(model, nn.CrossEntropyLoss(), x, y, "again")
    assert captures == []


def test_concurrent_calls_with_many_batch_sizes():
    """Threads sharing one plan, each with its own batch sizes, past the layout cache's size, with a
    1 us switch interval (a KeyError in the layout cache's eviction before)."""
    model, x, y = _regression()
    v = [torch.randn_like(p) for p in model.parameters()]
    errors = []

    def work(offset):
        try:
            for n in range(1, 90):
                m = 1 + (n * 7 + offset) % 80
                hessext.hvp(model, F.mse_loss, x[:1].expand(m, 3).contiguous(), y[:1].expand(m, 2).contiguous(), v)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(j,)) for j in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []


SCALE = {"value": 1.0}


def helper_scale():
    return SCALE["value"]


class Configured(nn.Module):
    """A forward that reads a dict, a list and a namespace attribute, a class attribute and a global
    through a helper function."""

    factor = 1.0

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 2)
        self.cfg = {"scale": 1.0}
        self.steps = [1.0]
        self.ns = types.SimpleNamespace(shift=1.0)

    def forward(self, x):
        h = torch.tanh(self.fc1(x) * self.cfg["scale"] * self.steps[0] * self.ns.shift)
        return self.fc2(h) * Configured.factor * helper_scale()


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.cfg.update(scale=2.0),
        lambda m: m.steps.__setitem__(0, 0.5),
        lambda m: setattr(m.ns, "shift", 3.0),
        lambda m: setattr(Configured, "factor", 2.0),
        lambda m: SCALE.update(value=1.5),
    ],
    ids=["dict", "list", "namespace", "class attribute", "global via helper"],
)
def test_forward_reading_mutated_state(change):
    torch.manual_seed(0)
    model = Configured().double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    try:
        check(model, F.mse_loss, x, y, "before")
        change(model)
        check(model, F.mse_loss, x, y, "after")
    finally:
        Configured.factor, SCALE["value"] = 1.0, 1.0


class Remembers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        self.last_hidden = torch.tanh(self.fc1(x))
        return self.fc2(self.last_hidden)


def test_forward_that_stores_on_self():
    """A forward that assigns self.last_hidden: no tracing Proxy is left behind (every later call
    raised TraceError), and the call runs through torch."""
    torch.manual_seed(0)
    model = Remembers().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    assert "assigns Remembers.last_hidden" in hessext.plan(model, F.mse_loss).reason
    for _ in range(2):
        check(model, F.mse_loss, x, y, "stores on self")
    model(x)
    assert isinstance(model.last_hidden, torch.Tensor)
