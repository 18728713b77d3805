"""input_hessian carrying its gradient: values, and gradients through them in the weights, biases,
inputs and targets, against torch.func (the diagonal blocks of jacrev(jacrev(loss)) in the inputs,
differentiated by autograd), float64 to 1e-10 relative to the largest reference entry (float32 to 1e-4),
on random stacks with every activation the kernels serve, every native loss (with a log_softmax model
end for NLL), both reductions, several outputs, bias on and off, N = 1 and more. The kernels' jets and
their reverse pass carry it on the CPU (the op hessext::output_jets in the graph); a second derivative
through it equals nested autograd's; torch.autograd.gradcheck on a small case."""

import random

import pytest
import torch
import torch.nn as nn
from torch.func import jacrev

import hessext
from cases import ACTIVATIONS, assert_close

LOSSES = ["mse", "huber", "bce", "ce", "nll"]


def case_of(seed, dtype=torch.float64):
    rng = random.Random(seed)
    act, loss = ACTIVATIONS[seed % len(ACTIVATIONS)], LOSSES[seed % len(LOSSES)]
    torch.manual_seed(seed)
    widths = (
        [rng.randint(1, 4)]
        + [rng.choice([1, rng.randint(2, 7)]) for _ in range(rng.randint(1, 3))]
        + [rng.randint(2, 3) if loss in ("ce", "nll") else rng.randint(1, 3)]
    )
    layers = []
    for j, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(i, o, bias=rng.random() < 0.7))
        if j < len(widths) - 2:
            layers.append(act())
    if loss == "nll":
        layers.append(nn.LogSoftmax(dim=-1))
    model = nn.Sequential(*layers).to(dtype)
    N, C = rng.choice([1, 5]), widths[-1]
    reduction = rng.choice(["mean", "sum"])
    x = torch.randn(N, widths[0], dtype=dtype, requires_grad=True)
    if loss in ("ce", "nll"):
        y = torch.randint(0, C, (N,))
        loss_fn = (nn.CrossEntropyLoss if loss == "ce" else nn.NLLLoss)(reduction=reduction)
    else:
        y = (torch.rand(N, C, dtype=dtype) if loss == "bce" else torch.randn(N, C, dtype=dtype)).requires_grad_()
        loss_fn = {
            "mse": nn.MSELoss,
            "huber": lambda reduction: nn.HuberLoss(reduction=reduction, delta=0.5),
            "bce": nn.BCEWithLogitsLoss,
        }[loss](reduction=reduction)
    return model, loss_fn, x, y


def reference(model, loss_fn, x, y, diagonal):
    """The diagonal blocks of the loss's Hessian in the inputs, by reverse over reverse mode."""
    H = jacrev(jacrev(lambda xx: loss_fn(model(xx), y)))(x)  # [N, d, N, d]
    blocks = torch.stack([H[n, :, n, :] for n in range(x.shape[0])])
    return torch.diagonal(blocks, dim1=1, dim2=2) if diagonal else blocks


def gradients(out, weight, wanted):
    grads = torch.autograd.grad((out * weight).sum().sin(), wanted, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1) for g, t in zip(grads, wanted)])


def through_output_jets(t):
    nodes, seen = [t.grad_fn], set()
    while nodes:
        node = nodes.pop()
        seen.add(type(node).__name__)
        nodes += [n for n, _ in node.next_functions if n is not None]
    return any("outputjets" in name.lower().replace("_", "") for name in seen)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("diagonal", [False, True])
def test_values_and_gradients_against_torch_func(seed, diagonal):
    model, loss_fn, x, y = case_of(seed)
    assert hessext.plan(model, loss_fn).backend == "native"
    got = hessext.input_hessian(model, loss_fn, x, y, diagonal=diagonal, backend="native")
    ref = reference(model, loss_fn, x, y, diagonal)
    assert through_output_jets(got)
    assert_close(got, ref, 1e-10, "input Hessian")
    wanted = list(model.parameters()) + [x] + ([y] if y.requires_grad else [])
    weight = torch.randn_like(ref)
    assert_close(
        gradients(got, weight, wanted), gradients(ref, weight, wanted), 1e-10, "gradient through the input Hessian"
    )


def test_float32_and_no_graph_without_grad():
    model, loss_fn, x, y = case_of(3, torch.float32)
    got = hessext.input_hessian(model, loss_fn, x, y)
    ref = reference(model.double(), loss_fn, x.double(), y.double() if y.is_floating_point() else y, False)
    assert got.dtype == torch.float32 and through_output_jets(got)
    assert_close(got.double(), ref, 1e-4, "float32 input Hessian")
    model.float()
    with torch.no_grad():
        assert hessext.input_hessian(model, loss_fn, x, y).grad_fn is None
    model.requires_grad_(False)
    assert hessext.input_hessian(model, loss_fn, x.detach(), y.detach()).grad_fn is None


def test_second_derivative_through_the_input_hessian():
    """A Hessian-vector product of a loss holding the input Hessian: the reverse pass differentiated
    once more (autograd through the jets in torch ops) equals nested autograd's."""
    model, loss_fn, x, y = case_of(5)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]

    def hvp(H):
        grads = torch.autograd.grad((H**2).sum(), params, create_graph=True, allow_unused=True)
        dot = sum((g * w).sum() for g, w in zip(grads, v) if g is not None)
        return gradients(dot, torch.ones(()), params + [x])

    assert_close(
        hvp(hessext.input_hessian(model, loss_fn, x, y)),
        hvp(reference(model, loss_fn, x, y, False)),
        1e-10,
        "HVP through the input Hessian",
    )


def test_gradcheck():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2), nn.LogSoftmax(-1)).double()
    y = torch.tensor([1, 0, 1])
    W = model[0].weight

    def f(x, w):
        return hessext.input_hessian(model, nn.NLLLoss(), x, y, params={"0.weight": w}, backend="native")

    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, W.detach().clone().requires_grad_()))
