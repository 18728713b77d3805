"""A physics-informed network for the Poisson equation on the unit square, trained through
hessext's input derivatives:

    -Laplace(u) = f in (0, 1)^2,  u = 0 on the boundary,  f = 2 pi^2 sin(pi x) sin(pi y),

whose solution is u* = sin(pi x) sin(pi y). The loss is mean((-lap u - f)^2) over interior points
plus mean(u^2) over boundary points, for a Tanh network [2,32,32,1] (1,153 parameters). Optimizers:
Adam (learning rate 1e-3), L-BFGS (strong Wolfe line search), or energy natural gradient
(hessext.optim.ENGD: the loss's Gramian from hessext.GramianOperator, a dense solve and a line search).
Prints the relative L2 error against u* on a 101 x 101 grid every so often, the wall time, and as
its last line `relative L2 error: <value>`.

    python examples/pinn_poisson.py [--optimizer engd|adam|lbfgs] [--seconds 300] [--laplacian torch.func]
    python examples/pinn_poisson.py --compare 60     # all three, 60 s each: writes pinn_poisson.png

--laplacian torch.func takes the Laplacian from torch.func (vmap of the Hessian per point) instead of
hessext, for Adam and L-BFGS, to compare the time per step; ENGD needs hessext's Gramian."""

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


def points(n_interior=900, n_boundary=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    inside = torch.rand(n_interior, 2, generator=g, dtype=torch.float64)
    t = torch.rand(n_boundary, generator=g, dtype=torch.float64)
    side = torch.randint(0, 4, (n_boundary,), generator=g)
    edge = torch.stack(
        [torch.where(side < 2, t, (side == 2).double()), torch.where(side < 2, (side == 1).double(), t)], 1
    )
    return inside, edge


def grid(n=101):
    """n x n points covering the closed unit square, [n * n, 2]."""
    axis = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)


def exact(x):
    return torch.sin(math.pi * x[:, :1]) * torch.sin(math.pi * x[:, 1:])


def laplacian_torch_func(model, x):
    H = vmap(hessian(lambda p: model(p[None])[0, 0]))(x)
    return torch.diagonal(H, dim1=1, dim2=2).sum(-1, keepdim=True)


class Problem:
    """The network, the points, the loss terms and the error against u*."""

    def __init__(self, laplacian="hessext"):
        self.model = network()
        self.inside, self.edge = points()
        self.f = 2 * math.pi**2 * exact(self.inside)
        self.laplacian = hessext.laplacian if laplacian == "hessext" else laplacian_torch_func
        self.test = grid()
        self.truth = exact(self.test)

    def interior(self, u, grad_u, lap_u, inputs):  # a term of (u, grad u, lap u) at the points: for ENGD
        return ((-lap_u - self.f) ** 2).mean()

    def boundary(self, u, grad_u, lap_u, inputs):
        return (u**2).mean()

    @property
    def terms(self):
        return [(self.interior, self.inside), (self.boundary, self.edge)]

    def loss(self):  # the same loss, by autograd through the Laplacian: for Adam and L-BFGS
        return ((-self.laplacian(self.model, self.inside) - self.f) ** 2).mean() + (self.model(self.edge) ** 2).mean()

    def error(self):
        with torch.no_grad():
            return float((self.model(self.test) - self.truth).norm() / self.truth.norm())


def train(optimizer, seconds, laplacian="hessext", report=10.0, steps=None, log=print):
    """Train until `seconds` of wall time (or `steps` steps); returns [(time, error)] and the steps."""
    problem = Problem(laplacian)
    model = problem.model
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            loss = problem.loss()
            loss.backward()
            opt.step()
            return loss.detach()
    elif optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            model.parameters(),
            lr=1.0,
            max_iter=20,
            history_size=50,
            tolerance_grad=1e-14,
            tolerance_change=1e-16,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = problem.loss()
            loss.backward()
            return loss

        def step():
            return opt.step(closure).detach()
    else:
        if laplacian != "hessext":
            raise SystemExit("ENGD takes the Gramian from hessext: use --laplacian hessext")
        opt = hessext.optim.ENGD(model, problem.terms, damping=1e-10, solver="dense")

        def step():
            return opt.step()

    curve, count, start, last = [(0.0, problem.error())], 0, time.perf_counter(), 0.0
    while True:
        loss = step()
        count += 1
        now = time.perf_counter() - start
        if now - last >= report or now >= seconds or count == steps:
            curve.append((now, problem.error()))
            last = now
            log(
                f"{optimizer:5s} t = {now:7.1f} s  step {count:6d}  loss {float(loss):.3e}  "
                f"relative L2 error {curve[-1][1]:.3e}"
            )
        if now >= seconds or count == steps:
            return curve, count, problem


def compare(seconds, out):
    """All three optimizers for `seconds` each; the error against wall time, plotted to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("adam", "Adam"), ("lbfgs", "L-BFGS"), ("engd", "ENGD (hessext)")):
        curve, count, _ = train(name, seconds, report=seconds / 30)
        ax.semilogy([t for t, _ in curve], [e for _, e in curve], label=f"{label}: {curve[-1][1]:.1e}")
        print(f"{name}: {count} steps in {curve[-1][0]:.0f} s, relative L2 error {curve[-1][1]:.3e}")
    ax.set_xlabel("wall time (s), 2 CPU threads")
    ax.set_ylabel("relative L2 error")
    ax.set_title("Poisson PINN, Tanh [2,32,32,1]")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=["engd", "adam", "lbfgs"], default="engd")
    parser.add_argument("--seconds", type=float, default=300.0, help="wall-time budget")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps instead")
    parser.add_argument("--laplacian", choices=["hessext", "torch.func"], default="hessext")
    parser.add_argument(
        "--compare",
        type=float,
        default=None,
        metavar="SECONDS",
        help="run all three optimizers for SECONDS each and plot the error against time",
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "pinn_poisson.png"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.compare is not None:
        compare(args.compare, args.out)
        return
    curve, count, _ = train(args.optimizer, args.seconds, args.laplacian, steps=args.steps)
    print(
        f"{args.optimizer} with the {args.laplacian} Laplacian: {count} steps, {curve[-1][0]:.1f} s "
        f"({curve[-1][0] / count * 1e3:.2f} ms a step)"
    )
    print(f"relative L2 error: {curve[-1][1]:.3e}")


if __name__ == "__main__":
    main()
