"""Train the 1-16-1 Tanh network (Linear(1,16)-Tanh-Linear(16,1)) on a 1-D regression with hessext's
AdaHessian and Sophia (exact diagonal, native, and the Hutchinson estimate) and with Adam, and plot
the training loss curves to examples/train_1d.png (needs matplotlib).

    python examples/train_1d.py [--steps 500] [--out examples/train_1d.png]"""

import argparse
import copy
import os
import time

import torch
import torch.nn as nn

import hessext
from demo import Model  # the 1-16-1 Tanh network, as its user wrote it
from hessext.optim import AdaHessian, Sophia


def data(n=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 0] + 0.05 * torch.randn(n, generator=g)
    return x, y


def train(make_opt, model, x, y, steps):
    loss_fn = nn.MSELoss()
    opt = make_opt(model, loss_fn)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        if isinstance(opt, torch.optim.Adam):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        else:
            loss = opt.step(x, y)
        losses.append(loss.item())
    return losses, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_1d.png"))
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = data()
    init = Model()
    print(f"backend for the diagonal: {hessext.plan(init, nn.MSELoss()).backend}")
    runs = {
        "Adam (lr 0.01)": lambda m, f: torch.optim.Adam(m.parameters(), lr=0.01),
        "AdaHessian, exact diagonal (defaults)": lambda m, f: AdaHessian(m, f, estimator="exact"),
        "AdaHessian, Hutchinson (lr 0.05)": lambda m, f: AdaHessian(
            m, f, lr=0.05, estimator="hutchinson", generator=torch.Generator().manual_seed(0)
        ),
        "Sophia, exact diagonal (lr 0.01)": lambda m, f: Sophia(m, f, lr=0.01, estimator="exact", update_every=1),
        "Sophia, GGN diagonal (lr 0.01)": lambda m, f: Sophia(m, f, lr=0.01, estimator="ggn", update_every=1),
        "Sophia, Hutchinson (lr 0.01)": lambda m, f: Sophia(
            m, f, lr=0.01, estimator="hutchinson", update_every=1, generator=torch.Generator().manual_seed(0)
        ),
    }
    curves = {}
    for name, make in runs.items():
        losses, seconds = train(make, copy.deepcopy(init), x, y, args.steps)
        curves[name] = losses
        print(f"{name:40s} final loss {losses[-1]:.4f}  ({seconds:.2f} s for {args.steps} steps)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, losses in curves.items():
        ax.plot(losses, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training MSE")
    ax.set_title("The 1-16-1 Tanh network on a 1-D regression (N=100)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
