"""Bad input: a ValueError/TypeError naming the argument, raised before any kernel runs."""

import pytest
import torch
import torch.nn as nn

import hessext
from cases import TinyTanhModel, tiny_tanh_loss
from hessext import ops


@pytest.fixture
def no_kernel(monkeypatch):
    """Any kernel call during these tests is a failure: the checks must come first."""

    def tripwire(name, *args):
        raise AssertionError(f"the kernel {name} ran before the argument check")

    monkeypatch.setattr(ops, "call", tripwire)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    net = TinyTanhModel().double()
    x = torch.randn(10, 1, dtype=torch.float64)
    y = torch.randn(10, dtype=torch.float64)
    v = {k: torch.randn_like(p) for k, p in net.named_parameters()}
    return net, x, y, v


def call(setup, **changes):
    net, x, y, v = setup
    args = dict(inputs=x, targets=y, vectors=v)
    args.update(changes)
    kwargs = {k: args.pop(k) for k in ("params", "backend") if k in args}
    return hessext.hvp(net, tiny_tanh_loss, args["inputs"], args["targets"], args["vectors"], **kwargs)


CASES = [
    (
        "vectors entry shape",
        lambda s: dict(vectors={**s[3], "fc1.weight": torch.zeros(16, 2, dtype=torch.float64)}),
        ValueError,
        r"vectors\['fc1.weight'\] must have shape \(16, 1\)",
    ),
    (
        "vectors batched inconsistently",
        lambda s: dict(vectors={**s[3], "fc1.bias": torch.zeros(3, 16, dtype=torch.float64)}),
        ValueError,
        r"vectors\['fc1.bias'\] must have shape \(16,\)",
    ),
    ("vectors list count", lambda s: dict(vectors=list(s[3].values())[:3]), ValueError, r"vectors must hold 4 tensors"),
    (
        "vectors dict names",
        lambda s: dict(vectors={("x" + k): t for k, t in s[3].items()}),
        ValueError,
        r"vectors must have exactly the names of the parameters differentiated in.*missing",
    ),
    (
        "flat vector length",
        lambda s: dict(vectors=torch.zeros(50, dtype=torch.float64)),
        ValueError,
        r"vectors as a flat tensor must have shape \[49\] or \[K, 49\]",
    ),
    (
        "vectors dtype",
        lambda s: dict(vectors={k: t.float() for k, t in s[3].items()}),
        TypeError,
        r"vectors\['fc1.weight'\] must have dtype torch.float64",
    ),
    (
        "vectors device",
        lambda s: dict(vectors={k: t.to("meta") for k, t in s[3].items()}),
        ValueError,
        r"vectors\['fc1.weight'\] must be on cpu",
    ),
    ("vectors type", lambda s: dict(vectors=3.0), TypeError, r"vectors must be a dict"),
    ("inputs dtype", lambda s: dict(inputs=s[1].float()), TypeError, r"inputs must have dtype torch.float64"),
    (
        "integer inputs",
        lambda s: dict(inputs=torch.ones(10, 1, dtype=torch.int64)),
        TypeError,
        r"inputs must have dtype torch.float64.*torch.int64",
    ),
    ("inputs device", lambda s: dict(inputs=s[1].to("meta")), ValueError, r"inputs must be on cpu"),
    (
        "inputs features",
        lambda s: dict(inputs=torch.zeros(10, 3, dtype=torch.float64)),
        ValueError,
        r"inputs must have 1 features \(the in_features of Linear 'fc1'\)",
    ),
    (
        "empty batch",
        lambda s: dict(inputs=torch.zeros(0, 1, dtype=torch.float64), targets=torch.zeros(0, dtype=torch.float64)),
        ValueError,
        r"inputs must hold at least one sample",
    ),
    ("inputs type", lambda s: dict(inputs=[[1.0]]), TypeError, r"inputs must be a torch.Tensor"),
    (
        "targets shape",
        lambda s: dict(targets=torch.zeros(10, 1, dtype=torch.float64)),
        ValueError,
        r"targets must have shape \(10,\) \(the model's output shape",
    ),
    ("targets dtype", lambda s: dict(targets=s[2].float()), TypeError, r"targets must have dtype torch.float64"),
    ("targets device", lambda s: dict(targets=s[2].to("meta")), ValueError, r"targets must be on cpu"),
    ("params type", lambda s: dict(params=[1, 2]), TypeError, r"params must be a dict"),
    (
        "params names",
        lambda s: dict(params={"fc1.weight": s[0].fc1.weight, "fc3.bias": s[0].fc1.bias}),
        ValueError,
        r"params must map some or all of the model's parameter names.*unexpected \['fc3.bias'",
    ),
    (
        "vectors for params",
        lambda s: dict(params={"fc1.weight": s[0].fc1.weight}),
        ValueError,
        r"vectors must have exactly the names of the parameters differentiated in \['fc1.weight'\]",
    ),
    (
        "params shape",
        lambda s: dict(params={**dict(s[0].named_parameters()), "fc2.bias": torch.zeros(2, dtype=torch.float64)}),
        ValueError,
        r"params\['fc2.bias'\] must have shape \(1,\)",
    ),
    (
        "params dtype",
        lambda s: dict(params={k: p.float() for k, p in s[0].named_parameters()}),
        TypeError,
        r"params\['fc1.weight'\] must be torch.float64",
    ),
    ("backend", lambda s: dict(backend="cuda"), ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("name,change,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input(setup, no_kernel, name, change, exc, match):
    with pytest.raises(exc, match=match):
        call(setup, **change(setup))


def test_loss_that_is_not_scalar(setup, no_kernel):
    net, x, y, v = setup
    with pytest.raises(ValueError, match=r"loss_fn reduces only dims \(0,\).*not return a scalar"):
        hessext.hvp(
            net, tiny_tanh_loss, torch.randn(10, 2, 1, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64), v
        )


def test_model_and_loss_types():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        hessext.plan(lambda x: x, nn.MSELoss())
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        hessext.plan(nn.Linear(2, 2), "mse")


def test_direct_op_checks_name_arguments():
    """The C++ op checks its own arguments too, for callers of torch.ops.hessext.hvp."""
    assert ops.available()
    W = [torch.randn(4, 3, dtype=torch.float64)]
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"targets must have shape"):
        torch.ops.hessext.hvp(x, y[:, :2], W, [None], [], [], 0, 0.0, 1.0, [torch.randn(1, 4, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"vectors\[0\] must have shape"):
        torch.ops.hessext.hvp(x, y, W, [None], [], [], 0, 0.0, 1.0, [torch.randn(1, 3, 4, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"inputs must have dtype"):
        torch.ops.hessext.hvp(x.float(), y, W, [None], [], [], 0, 0.0, 1.0, [torch.randn(1, 4, 3, dtype=torch.float64)])


def test_shape_checks_hold_after_the_layout_is_cached(setup):
    """hessext.inputs.native_batch keeps each (inputs.shape, targets.shape) pair's checked layout: a
    pair seen before skips the checks, a new pair is checked, and each batch size keeps its own mean
    scale (float64 torch.func reference, 1e-12 relative)."""
    net, x, y, v = setup
    first = call(setup)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"targets must have shape \(10,\)"):
            call(setup, targets=torch.zeros(10, 1, dtype=torch.float64))
    for n in (7, 10, 7):
        got = hessext.hvp(net, tiny_tanh_loss, x[:n], y[:n], v)
        ref = hessext.hvp(net, tiny_tanh_loss, x[:n], y[:n], v, backend="torch.func")
        for k in v:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-12 * ref[k].abs().max().item())
    assert all(torch.equal(first[k], call(setup)[k]) for k in v)


def test_a_build_for_another_torch_is_refused_or_warned(monkeypatch):
    """The build's torch is compared with the running one when hessext._C loads: another minor release
    is refused with an ImportError that says how to rebuild, another patch release warns."""
    import warnings

    from hessext import _native

    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    with pytest.raises(
        ImportError, match=r"built against torch 2\.14\.1.*torch 2\.13\.0\+cpu is running.*--no-build-isolation"
    ):
        _native.check_torch_version("2.14.1")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _native.check_torch_version("2.13.1")
        _native.check_torch_version("2.13.0")
    assert len(seen) == 1 and "built against torch 2.13.1" in str(seen[0].message)
