"""Shared test cases: random Linear/Tanh stacks, the two seed models, devices and dtypes, and a
comparison that reports the largest error and where it is."""

import torch
import torch.nn as nn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]
# Tolerances against the float64 torch.func reference (relative to the largest reference entry):
# float64 results agree to rounding, float32 to the accumulated rounding of a few thousand products.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-4}
# Every activation the kernels serve, as module factories (parameters off their defaults where they have one).
ACTIVATIONS = [
    nn.Tanh,
    nn.ReLU,
    lambda: nn.LeakyReLU(0.1),
    nn.Sigmoid,
    nn.SiLU,
    nn.GELU,
    lambda: nn.GELU(approximate="tanh"),
    lambda: nn.Softplus(beta=2.0),
    nn.ELU,
]


class TinyTanhModel(nn.Module):
    """The 1-16-1 Tanh network, as written by the user: Linear(1,16)-Tanh-Linear(16,1), squeezed output."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(1, 16)
        self.fc2 = nn.Linear(16, 1)
        self.af = nn.Tanh()

    def forward(self, x):
        x = self.fc1(x)
        x = self.af(x)
        x = self.fc2(x)
        return x.squeeze(-1)


def tiny_tanh_loss(outputs, targets):
    """The 1-16-1 network's loss, as written by the user."""
    return torch.mean((outputs - targets) ** 2, dim=0)


def log_softmax_classifier(d=5, hidden=8, classes=3):
    """A log-softmax classifier: an MLP that outputs a log-softmax (with nn.NLLLoss as its loss)."""
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes), nn.LogSoftmax(dim=-1))


def random_stack(rng, *, max_depth=5, max_width=64):
    """(widths, bias flags, activations) of a random stack; widths include 1 with some probability."""
    depth = rng.randint(1, max_depth)
    widths = [rng.choice([1, rng.randint(1, max_width)]) for _ in range(depth + 1)]
    biases = [rng.random() < 0.7 for _ in range(depth)]
    acts = [rng.choice(["tanh", "tanh", "identity"]) for _ in range(depth - 1)]
    return widths, biases, acts


def build_stack(widths, biases, acts, dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    layers = []
    for j, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(i, o, bias=biases[j]))
        if j < len(acts):
            layers.append(nn.Tanh() if acts[j] == "tanh" else nn.Identity())
    return nn.Sequential(*layers).to(dtype=dtype, device=device)


def random_batch(model_in, model_out, n, dtype=torch.float64, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model_in, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    y = torch.randn(n, model_out, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return x, y


def as_float64(model):
    import copy

    return copy.deepcopy(model).to(torch.float64)


def to_flat(result, batched):
    """A dict/list/tuple/flat-tensor result as one float64 tensor, [K, P] if batched else [P]."""
    if isinstance(result, torch.Tensor):
        return result.double()
    items = list(result.values()) if isinstance(result, dict) else list(result)
    if batched:
        return torch.cat([t.double().reshape(t.shape[0], -1) for t in items], 1)
    return torch.cat([t.double().reshape(-1) for t in items])


def assert_close(actual, expected, rtol, what="", floor=1e-30):
    """Max |actual - expected| <= rtol * max(max |expected|, floor); on failure say where."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs()
    worst = err.max().item()
    if worst > rtol * scale + 1e-300:
        where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{what}: max error {worst:.3e} at {where} (actual {actual[where].item():.6e}, "
            f"expected {expected[where].item():.6e}), allowed {rtol:.1e} x {scale:.3e}"
        )


def flat_params(model):
    """({name: detached float64 tensor}, names, sizes) of a model."""
    params = {k: p.detach().double() for k, p in model.named_parameters()}
    return params, list(params), [p.numel() for p in params.values()]


def reference_hessian(model, loss_fn, x, y):
    """The dense float64 Hessian [P, P] by torch.func, in named_parameters() order."""
    import copy

    from hessext import fallback

    m64 = copy.deepcopy(model).double()
    params, names, sizes = flat_params(m64)
    P = sum(sizes)
    eye = torch.eye(P, dtype=torch.float64)
    basis = dict(zip(names, [c.reshape((P,) + params[n].shape) for c, n in zip(eye.split(sizes, 1), names)]))
    x64 = x.double() if x.is_floating_point() else x
    y64 = y.double() if y.is_floating_point() else y
    out = fallback.hvp(m64, loss_fn, x64, y64, params, basis)
    return torch.cat([out[n].reshape(P, -1) for n in names], 1)


def reference_ggn(model, loss_fn, x, y):
    """The dense float64 GGN J^T H_out J [P, P] by torch.func (J by jacrev, H_out by hessian)."""
    import copy

    from torch.func import functional_call, hessian, jacrev

    m64 = copy.deepcopy(model).double()
    params, names, sizes = flat_params(m64)
    x64 = x.double() if x.is_floating_point() else x
    y64 = y.double() if y.is_floating_point() else y
    out = functional_call(m64, params, (x64,))
    J = jacrev(lambda p: functional_call(m64, p, (x64,)))(params)
    J = torch.cat([J[n].reshape(out.numel(), -1) for n in names], 1)
    H_out = hessian(lambda o: loss_fn(o, y64))(out.detach()).reshape(out.numel(), out.numel())
    return J.T @ H_out @ J


def as_dict_flat(result, names):
    return torch.cat([result[n].double().reshape(-1) for n in names])
