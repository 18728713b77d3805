"""Every row of the activation and loss tables, through every native op, against float64 torch.func.

Random stacks mix the activations in one model (widths include 1, batches include 1, bias on and
off), each with a random loss of the table in both reductions, in float32 and float64, through
both CPU paths (fused per-sample loops and GEMMs). Tolerances (relative to the largest reference
entry): tests/cases.py RTOL, 1e-10 for float64 and 2e-4 for float32 (input Hessians: relative to at
least 1e-5, since a softmax that is nearly one-hot leaves float32 entries of 1e-7); native invariants
(hessian @ v == hvp, diag(hessian) == hessian_diag, symmetry) to 1e-12 in float64."""

import copy
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import hessian as func_hessian
from torch.func import jacfwd, jacrev, vmap

import hessext
from cases import DEVICES, DTYPES, RTOL, as_dict_flat, assert_close, reference_ggn, reference_hessian, to_flat

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "softplus": lambda: nn.Softplus(beta=2.0, threshold=1.0),  # both branches on a randn batch
    "elu": lambda: nn.ELU(0.7),
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}
LOSSES = ["mse", "huber", "bce", "ce", "ce-probs", "ce-smooth", "ce-ignore", "nll"]


def make_loss(kind, reduction):
    return {
        "mse": nn.MSELoss(reduction=reduction),
        "huber": nn.HuberLoss(reduction=reduction, delta=0.5),
        "bce": nn.BCEWithLogitsLoss(reduction=reduction),
        "ce": nn.CrossEntropyLoss(reduction=reduction),
        "ce-probs": nn.CrossEntropyLoss(reduction=reduction),
        "ce-smooth": nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1),
        "ce-ignore": nn.CrossEntropyLoss(reduction=reduction, ignore_index=1),
        "nll": nn.NLLLoss(reduction=reduction),
    }[kind]


def make_targets(kind, n, C, dtype, device, g):
    if kind in ("mse", "huber"):
        return torch.randn(n, C, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    if kind == "bce":
        return torch.rand(n, C, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    if kind == "ce-probs":
        return torch.rand(n, C, generator=g, dtype=torch.float64).softmax(-1).to(dtype=dtype, device=device)
    t = torch.randint(0, C, (n,), generator=g)
    if kind == "ce-ignore" and C > 1:
        t[0] = 1  # at least one ignored row (and more by chance)
    return t.to(device)


def random_case(case, dtype=torch.float64, device="cpu"):
    """A random mixed-activation stack, a random loss row and a batch: (model, loss, x, y, tag)."""
    rng = random.Random(1000 + case)
    depth = rng.randint(1, 4)
    widths = [rng.choice([1, rng.randint(1, 12)]) for _ in range(depth + 1)]
    kind = LOSSES[case % len(LOSSES)]
    if kind.startswith("ce") or kind == "nll":
        widths[-1] = rng.randint(2, 6)
    acts = [rng.choice(list(ACTIVATIONS)) for _ in range(depth - 1)]
    torch.manual_seed(case)
    layers = []
    for j, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(i, o, bias=rng.random() < 0.7))
        if j < len(acts):
            layers.append(ACTIVATIONS[acts[j]]())
    if kind == "nll":
        layers.append(nn.LogSoftmax(dim=-1))
    model = nn.Sequential(*layers).to(dtype=dtype, device=device)
    n = rng.choice([1, rng.randint(2, 9)])
    g = torch.Generator().manual_seed(case)
    x = torch.randn(n, widths[0], generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    y = make_targets(kind, n, widths[-1], dtype, device, g)
    reduction = rng.choice(["mean", "sum"])
    return model, make_loss(kind, reduction), x, y, f"{widths} {acts} {kind}/{reduction} n={n}"


def names_of(model):
    return [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(24))
def test_every_row_through_every_op(case, dtype, path):
    model, loss, x, y, tag = random_case(case, dtype)
    plan = hessext.plan(model, loss)
    assert plan.backend == "native", (tag, plan.reason)
    names = names_of(model)
    P = sum(p.numel() for p in model.parameters())
    H = reference_hessian(model, loss, x, y)
    V = torch.randn(3, P, dtype=torch.float64, generator=torch.Generator().manual_seed(case))
    rtol = RTOL[dtype]
    assert_close(hessext.hvp(model, loss, x, y, V.to(dtype), backend="native"), V @ H, rtol, f"hvp {tag}")
    assert_close(
        as_dict_flat(hessext.hessian_diag(model, loss, x, y, backend="native"), names),
        torch.diagonal(H),
        rtol,
        f"diag {tag}",
    )
    assert_close(hessext.hessian(model, loss, x, y, output="matrix", backend="native"), H, rtol, f"hessian {tag}")
    per = hessext.hessian_diag(model, loss, x, y, per_sample=True, backend="native")
    assert all(t.shape[0] == x.shape[0] for t in per.values())
    assert_close(
        as_dict_flat({k: t.sum(0) for k, t in per.items()}, names), torch.diagonal(H), rtol, f"per-sample {tag}"
    )
    if not isinstance(loss, nn.NLLLoss):  # after LogSoftmax the GGN at the model output is zero: torch.func's
        G = reference_ggn(model, loss, x, y)
        assert_close(hessext.ggn_vp(model, loss, x, y, V.to(dtype), backend="native"), V @ G, rtol, f"ggn_vp {tag}")
        assert_close(
            as_dict_flat(hessext.ggn_diag(model, loss, x, y, backend="native"), names),
            torch.diagonal(G),
            rtol,
            f"ggn diag {tag}",
        )


@pytest.mark.parametrize("case", range(16))
def test_native_invariants(case):
    """hessian @ v == hvp, diag(hessian) == hessian_diag, exact symmetry: native against native."""
    model, loss, x, y, tag = random_case(case)
    H = hessext.hessian(model, loss, x, y, output="matrix")
    assert torch.equal(H, H.T), tag
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert_close(hessext.hvp(model, loss, x, y, v), H @ v, 1e-12, f"H v {tag}")
    assert_close(as_dict_flat(hessext.hessian_diag(model, loss, x, y), names_of(model)), torch.diagonal(H), 1e-12, tag)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(16))
def test_input_hessian_and_laplacian_of_every_row(case, dtype):
    model, loss, x, y, tag = random_case(case, dtype)
    model.requires_grad_(
        False
    )  # frozen weights: input derivatives run natively (with trainable ones they carry a gradient, through torch.func)
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    y64 = y.double() if y.is_floating_point() else y
    Hx = func_hessian(lambda xx: loss(m64(xx), y64))(x64)
    ref = torch.stack([Hx[n, :, n, :] for n in range(x.shape[0])])
    got = hessext.input_hessian(model, loss, x, y, backend="native")
    floor = 1e-5 if dtype == torch.float32 else 1e-30
    assert_close(got, ref, RTOL[dtype], f"input Hessian {tag}", floor)
    assert_close(
        hessext.input_hessian(model, loss, x, y, diagonal=True, backend="native"),
        torch.diagonal(ref, dim1=1, dim2=2),
        RTOL[dtype],
        f"input diagonal {tag}",
        floor,
    )
    if isinstance(loss, nn.NLLLoss):
        return  # the Laplacian of a log-softmax output is not a stack output the kernels serve
    out_h = vmap(jacfwd(jacrev(lambda xm: m64(xm[None])[0])))(x64)
    assert_close(
        hessext.laplacian(model, x), torch.diagonal(out_h, dim1=2, dim2=3).sum(-1), RTOL[dtype], f"Laplacian {tag}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_each_activation_closed_form(name, device):
    """One hidden unit, one sample, MSE: H_{w1 w1} = 2 (phi'(z)^2 w2^2 x^2 + r phi''(z) w2 x^2) with
    r = out - y, read from the kernel, against phi' and phi'' by autograd at the same z."""
    act = ACTIVATIONS[name]()
    model = nn.Sequential(nn.Linear(1, 1, bias=False), act, nn.Linear(1, 1, bias=False)).double().to(device)
    for z0 in (-1.3, -0.2, 0.4, 2.5):
        with torch.no_grad():
            model[0].weight.fill_(z0)
            model[2].weight.fill_(0.7)
        x = torch.ones(1, 1, dtype=torch.float64, device=device)
        y = torch.full((1, 1), 0.3, dtype=torch.float64, device=device)
        z = torch.tensor(z0, dtype=torch.float64, requires_grad=True)
        phi = act(z)
        (d1,) = torch.autograd.grad(phi, z, create_graph=True)
        d2 = torch.autograd.grad(d1, z)[0] if d1.requires_grad else torch.zeros(())
        r = 0.7 * phi.item() - 0.3
        want = 2 * (d1.item() ** 2 * 0.49 + r * d2.item() * 0.7)
        got = hessext.hessian_diag(model, nn.MSELoss(), x, y, backend="native")["0.weight"].item()
        assert abs(got - want) <= 1e-12 * max(1.0, abs(want)), (name, z0, got, want)


@pytest.mark.parametrize(
    "name,module",
    [
        ("relu", nn.ReLU()),
        ("leaky_relu", nn.LeakyReLU(0.3)),
        ("elu", nn.ELU(0.5)),
        ("softplus", nn.Softplus(beta=1.0, threshold=0.0)),
    ],
)
def test_kinks_follow_autograd(name, module):
    """At z = 0 exactly (zero weights), and at Softplus's threshold, the kernels take autograd's branch."""
    model = nn.Sequential(nn.Linear(2, 3), module, nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    H = reference_hessian(model, nn.MSELoss(), x, y)
    assert_close(hessext.hessian(model, nn.MSELoss(), x, y, output="matrix", backend="native"), H, 1e-12, name)
    assert_close(
        as_dict_flat(hessext.hessian_diag(model, nn.MSELoss(), x, y), names_of(model)), torch.diagonal(H), 1e-12, name
    )


def test_functional_forms_and_methods_are_native():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 4)

        def forward(self, x):
            x = F.gelu(self.a(x), approximate="tanh")
            x = self.b(x).relu()
            x = F.softplus(self.c(x), 3.0, 5.0)
            return F.log_softmax(self.d(x), dim=1)

    model = Functional().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 3, 2, 1, 1, 0])
    plan = hessext.plan(model, F.nll_loss)
    assert plan.backend == "native", plan.reason
    assert plan.spec[0] == [7, 2, 8] and plan.spec[1] == [0.0, 0.0, 0.0, 0.0, 3.0, 5.0]
    H = reference_hessian(model, F.nll_loss, x, y)
    assert_close(hessext.hessian(model, F.nll_loss, x, y, output="matrix"), H, 1e-10, "functional")
    assert_close(
        hessext.hvp(
            model,
            lambda o, t: 0.5 * F.cross_entropy(o, t, label_smoothing=0.2),
            x,
            y,
            torch.ones(H.shape[0], dtype=torch.float64),
        ),
        reference_hessian(model, lambda o, t: 0.5 * F.cross_entropy(o, t, label_smoothing=0.2), x, y).sum(1),
        1e-10,
        "scaled smoothed cross-entropy",
    )


@pytest.mark.parametrize(
    "model,loss,why",
    [
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), nn.NLLLoss(), "NLLLoss needs log-probabilities"),
        (nn.Sequential(nn.Linear(3, 2), nn.LogSoftmax(-1)), nn.MSELoss(), "ends in LogSoftmax"),
        (nn.Sequential(nn.Linear(3, 2), nn.LogSoftmax(-1), nn.Flatten(0)), nn.NLLLoss(), "after the final log_softmax"),
        (nn.Sequential(nn.Linear(3, 2)), nn.BCEWithLogitsLoss(pos_weight=torch.ones(2)), "a class weight"),
        (nn.Sequential(nn.Linear(3, 2)), nn.HuberLoss(delta=0.0), "delta > 0"),
        (nn.Sequential(nn.Linear(3, 2), nn.Hardtanh(), nn.Linear(2, 2)), nn.MSELoss(), "'hardtanh' after Linear '0'"),
    ],
    ids=[
        "nll-without-log-softmax",
        "log-softmax-mse",
        "after-log-softmax",
        "pos-weight",
        "huber-zero-delta",
        "hardtanh",
    ],
)
def test_what_stays_with_torch_says_why(model, loss, why):
    plan = hessext.plan(model.double(), loss)
    assert plan.backend == "torch.func" and why in plan.reason, plan.reason


def test_class_targets_layouts_and_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0, 2, 1, 1, 0])
    ce = nn.CrossEntropyLoss()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    # one unbatched sample: output [C], target a scalar index
    assert_close(
        hessext.hvp(model, ce, x[0], t[0], v), reference_hessian(model, ce, x[0], t[0]) @ v, 1e-10, "unbatched"
    )
    # a [N, T, C] output reads the classes in dim 1: torch computes it
    x3 = torch.randn(2, 3, 3, dtype=torch.float64)
    t3 = torch.randint(0, 3, (2, 3))
    assert_close(hessext.hvp(model, ce, x3, t3, v), reference_hessian(model, ce, x3, t3) @ v, 1e-10, "dim-1 classes")
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        hessext.hvp(model, ce, x, torch.tensor([0, 3, 1, 1, 0]), v)
    with pytest.raises(ValueError, match=r"class indices must have shape \(5,\)"):
        hessext.hvp(model, ce, x, t[:4], v)
    with pytest.raises(TypeError, match="targets of NLLLoss must be class indices"):
        hessext.hvp(nn.Sequential(model, nn.LogSoftmax(-1)), nn.NLLLoss(), x, torch.rand(5, 3, dtype=torch.float64), v)
    # every target ignored: the mean's loss is 0/0, its derivatives are zero in torch, and here
    ignored = torch.full((5,), -100)
    got = hessext.hvp(model, ce, x, ignored, v)
    assert torch.equal(got, hessext.hvp(model, ce, x, ignored, v, backend="torch.func"))
    assert torch.count_nonzero(got) == 0


def test_ggn_after_log_softmax_is_torch_funcs_definition():
    """The GGN splits at the model's output: zero after LogSoftmax + NLL (torch.func computes it);
    backend='native' says why it cannot serve it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3), nn.LogSoftmax(-1)).double()
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    g = hessext.ggn_diag(model, nn.NLLLoss(), x, t)
    assert all(torch.count_nonzero(v) == 0 for v in g.values())
    with pytest.raises(ValueError, match="CrossEntropyLoss on the logits"):
        hessext.ggn_vp(model, nn.NLLLoss(), x, t, torch.ones(31, dtype=torch.float64), backend="native")


def test_cross_entropy_ggn_is_the_softmax_fisher():
    """On logits, the cross-entropy GGN is J^T (diag p - p p^T) J, the Fisher of the softmax."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 5)).double()
    x, t = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 5, (7,))
    G = reference_ggn(model, nn.CrossEntropyLoss(reduction="sum"), x, t)
    names = names_of(model)
    got = as_dict_flat(hessext.ggn_diag(model, nn.CrossEntropyLoss(reduction="sum"), x, t), names)
    assert_close(got, torch.diagonal(G), 1e-10, "softmax GGN diagonal")
    assert (got >= 0).all()


def test_log_softmax_classifier_as_written_is_native():
    """A log-softmax classifier: an MLP ending in LogSoftmax, nn.NLLLoss, the Hessian in the input and the
    weight diagonal."""
    from cases import log_softmax_classifier

    torch.manual_seed(0)
    model = (
        log_softmax_classifier().double().requires_grad_(False)
    )  # frozen weights: input derivatives run natively (with trainable ones they carry a gradient, through torch.func)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    assert hessext.plan(model, nn.NLLLoss()).backend == "native"
    ref = func_hessian(lambda xx: nn.NLLLoss()(model(xx), y))(x)
    ref = torch.stack([ref[n, :, n, :] for n in range(64)])
    assert_close(
        hessext.input_hessian(model, nn.NLLLoss(), x, y, backend="native"),
        ref,
        1e-10,
        "log-softmax classifier input Hessian",
    )
    H = reference_hessian(model, nn.NLLLoss(), x, y)
    assert_close(
        as_dict_flat(hessext.hessian_diag(model, nn.NLLLoss(), x, y, backend="native"), names_of(model)),
        torch.diagonal(H),
        1e-10,
        "log-softmax classifier diagonal",
    )


def test_flat_result_formats_unchanged_for_new_rows():
    model = nn.Sequential(nn.Linear(3, 4), nn.ELU(), nn.Linear(4, 2)).float()
    x, y = torch.randn(5, 3), torch.rand(5, 2)
    V = {k: torch.randn(2, *p.shape) for k, p in model.named_parameters()}
    got = hessext.hvp(model, nn.BCEWithLogitsLoss(), x, y, V)
    assert isinstance(got, dict) and all(got[k].shape == V[k].shape and got[k].dtype == torch.float32 for k in V)
    H = reference_hessian(model, nn.BCEWithLogitsLoss(), x, y)
    assert_close(to_flat(got, True), to_flat(V, True).double() @ H, 2e-4, "float32 BCE")
