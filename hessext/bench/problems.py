"""The benchmark problems: Tanh MLPs with data and vectors, the float64 references every method is checked
against, and the check."""

from dataclasses import dataclass

import torch
import torch.nn as nn

import hessext


QUANTITIES = ("hvp", "hvp-batched", "ggn_vp", "diagonal", "hessian", "input-hessian", "laplacian")


PRESETS = {"tiny": [1, 16, 1], "pinn": [2, 50, 50, 50, 1], "mnist": [784, 256, 256, 10]}


DENSE_LIMIT = 3000  # parameters up to which dense references and dense peers are run


RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}


class Skip(Exception):
    """A method that cannot run here; the message is the note shown instead of a time."""


@dataclass
class Problem:
    widths: list
    batch: int
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    v: dict  # one vector, dict name -> tensor
    V: dict  # K vectors, dict name -> [K, *shape]

    @property
    def params(self):
        return {k: p.detach() for k, p in self.model.named_parameters()}

    @property
    def P(self):
        return sum(p.numel() for p in self.model.parameters())


def mse(out, target):
    """The explicit MSE every method sees (torch.func's jvp(grad) fails on F.mse_loss)."""
    return ((out - target) ** 2).mean()


def make_problem(widths, batch, device, dtype, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for j, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(i, o))
        if j < len(widths) - 2:
            layers.append(nn.Tanh())
    torch.manual_seed(seed)
    model = nn.Sequential(*layers).to(device=device, dtype=dtype)
    x = torch.randn(batch, widths[0], generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randn(batch, widths[-1], generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    v = {
        n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        for n, p in model.named_parameters()
    }
    V = {
        n: torch.randn((k,) + p.shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        for n, p in model.named_parameters()
    }
    return Problem(list(widths), batch, model, x, y, v, V)


def as_float64(pb):
    import copy

    to64 = lambda t: t.detach().to(torch.float64)  # noqa: E731
    return Problem(
        pb.widths,
        pb.batch,
        copy.deepcopy(pb.model).to(torch.float64),
        to64(pb.x),
        to64(pb.y),
        {n: to64(t) for n, t in pb.v.items()},
        {n: to64(t) for n, t in pb.V.items()},
    )


def flat(result):
    """Any method's result as one float64 tensor."""
    if isinstance(result, torch.Tensor):
        return result.detach().to(torch.float64).reshape(-1)
    items = result.values() if isinstance(result, dict) else result
    return torch.cat([flat(t) for t in items])


def reference(quantity, pb, seed=0):
    """(float64 reference values, index into the method's flat result or None for all of it)."""
    p64 = as_float64(pb)
    f = lambda v: hessext.hvp(p64.model, mse, p64.x, p64.y, v, backend="torch.func")  # noqa: E731
    if quantity == "hvp":
        return flat(f(p64.v)), None
    if quantity == "hvp-batched":
        return flat(f(p64.V)), None
    if quantity == "ggn_vp":
        return flat(hessext.ggn_vp(p64.model, mse, p64.x, p64.y, p64.v, backend="torch.func")), None
    if quantity in ("diagonal", "hessian"):
        P = pb.P
        rows = torch.randperm(P, generator=torch.Generator().manual_seed(seed))[: min(P, 24)]
        basis = torch.zeros(len(rows), P, dtype=torch.float64, device=pb.x.device)
        basis[torch.arange(len(rows)), rows.to(basis.device)] = 1
        H_rows = f(basis)  # [r, P]: rows of the Hessian
        if quantity == "diagonal":
            return H_rows[torch.arange(len(rows)), rows.to(H_rows.device)], rows
        return H_rows.reshape(-1), (rows[:, None] * P + torch.arange(P)).reshape(-1)
    if quantity == "input-hessian":
        return flat(hessext.input_hessian(p64.model, mse, p64.x, p64.y, backend="torch.func")), None
    return flat(hessext.laplacian(p64.model, p64.x, backend="torch.func")), None


def check(result, ref, index, dtype):
    """(ok, relative error) of a method's result against the reference."""
    got = flat(result)
    if index is not None:
        got = got[index.to(got.device)]
    if got.shape != ref.shape:
        return False, float("inf")
    err = ((got - ref.to(got.device)).abs().max() / ref.abs().max().clamp_min(1e-300)).item()
    return err <= RTOL[dtype], err
