"""A physics-informed network for the Poisson equation on the unit square, trained through
hessext's Laplacian:

    -Laplace(u) = f in (0, 1)^2,  u = 0 on the boundary,  f = 2 pi^2 sin(pi x) sin(pi y),

whose solution is u* = sin(pi x) sin(pi y). The loss is mean((-lap u - f)^2) over interior points
plus mean(u^2) over boundary points; Adam, then L-BFGS. Prints the relative L2 error against u* on a
grid and the time per step, for hessext and for the same loss with torch.func's Laplacian (vmap of
the Hessian per point), and writes examples/pinn_poisson.png.

    python examples/pinn_poisson.py [--adam 2000] [--lbfgs 1000] [--out examples/pinn_poisson.png]"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
from torch.func import hessian, vmap

import hessext


def network(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).double()


def points(n_interior=1024, n_boundary=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    inside = torch.rand(n_interior, 2, generator=g, dtype=torch.float64)
    t = torch.rand(n_boundary, generator=g, dtype=torch.float64)
    side = torch.randint(0, 4, (n_boundary,), generator=g)
    edge = torch.stack([torch.where(side < 2, t, (side == 2).double()), torch.where(side < 2, (side == 1).double(), t)], 1)
    return inside, edge


def grid(n=101):
    """n x n points covering the closed unit square, [n * n, 2]."""
    axis = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)


def exact(x):
    return torch.sin(math.pi * x[:, :1]) * torch.sin(math.pi * x[:, 1:])


def laplacian_hessext(model, x):
    return hessext.laplacian(model, x)


def laplacian_torch_func(model, x):
    H = vmap(hessian(lambda p: model(p[None])[0, 0]))(x)
    return torch.diagonal(H, dim1=1, dim2=2).sum(-1, keepdim=True)


def train(laplacian, adam_steps, lbfgs_steps):
    model = network()
    inside, edge = points()
    f = 2 * math.pi ** 2 * exact(inside)

    def loss_fn():
        return ((-laplacian(model, inside) - f) ** 2).mean() + (model(edge) ** 2).mean()

    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(adam_steps):
        adam.zero_grad()
        loss_fn().backward()
        adam.step()
    adam_time = (time.perf_counter() - start) / max(adam_steps, 1)
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=lbfgs_steps, history_size=50,
                              tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    if lbfgs_steps:
        lbfgs.step(closure)
    points_ = grid()
    with torch.no_grad():
        err = float((model(points_) - exact(points_)).norm() / exact(points_).norm())
    return model, err, adam_time, float(loss_fn().detach())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adam", type=int, default=2000)
    parser.add_argument("--lbfgs", type=int, default=1000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "pinn_poisson.png"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = {}
    for name, lap in (("hessext", laplacian_hessext), ("torch.func", laplacian_torch_func)):
        model, err, per_step, loss = train(lap, args.adam, args.lbfgs)
        results[name] = model
        print(f"{name:10s} relative L2 error {err:.2e}  final loss {loss:.2e}  Adam step {per_step * 1e3:.2f} ms")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 101
    xy = grid(n)
    with torch.no_grad():
        u = results["hessext"](xy).reshape(n, n)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, field, title in ((axes[0], u, "u, trained with hessext.laplacian"),
                             (axes[1], (u - exact(xy).reshape(n, n)).abs(), "|u - u*|")):
        im = ax.imshow(field.numpy().T, origin="lower", extent=(0, 1, 0, 1))
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
