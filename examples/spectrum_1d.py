"""The curvature of the 1-16-1 Tanh network (Linear(1,16)-Tanh-Linear(16,1)) during training with Adam on a
1-D regression: every few steps the top-5 Hessian eigenvalues (hessext.linalg.eigsh, checked against
the dense Hessian's eigvalsh), the trace (Hutch++) and the spectral density (stochastic Lanczos
quadrature), plotted to examples/spectrum_1d.png (needs matplotlib).

    python examples/spectrum_1d.py [--steps 300] [--every 50] [--out examples/spectrum_1d.png]"""

import argparse
import os

import torch
import torch.nn as nn

import hessext
from demo import Model  # the 1-16-1 Tanh network, as its user wrote it
from hessext import linalg
from train_1d import data


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "spectrum_1d.png"))
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = (t.double() for t in data())
    model, loss_fn = Model().double(), nn.MSELoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    H = hessext.HessianOperator(model, loss_fn, (x, y))
    print(f"P = {H.shape[0]}, backend: {hessext.plan(model, loss_fn).backend}")
    history, densities = [], []
    for step in range(args.steps + 1):
        if step % args.every == 0:
            g = torch.Generator().manual_seed(step)
            values, _ = linalg.eigsh(H, k=5, generator=g)
            dense = torch.linalg.eigvalsh(hessext.hessian(model, loss_fn, x, y, output="matrix")).flip(0)[:5]
            trace = linalg.trace(H, samples=30, generator=g)
            densities.append((step, *linalg.density(H, num_steps=H.shape[0], samples=4, generator=g)))
            history.append((step, values, trace))
            print(
                f"step {step:4d}  loss {loss_fn(model(x), y).item():.4f}  "
                f"top-5 {[round(v, 4) for v in values.tolist()]}"
                f"  (dense: max diff {(values - dense).abs().max().item():.1e})  trace {trace:.4f}"
            )
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h[0] for h in history]
    for j in range(5):
        left.plot(steps, [h[1][j].item() for h in history], marker="o", label=f"eigenvalue {j + 1}")
    left.plot(steps, [h[2] for h in history], "k--", label="trace (Hutch++)")
    left.set_xlabel("Adam step")
    left.set_title("top-5 Hessian eigenvalues (eigsh)")
    left.legend(fontsize=7)
    for step, grid, dens in densities:
        linalg.plot_density(grid, dens, ax=right, title="spectral density (SLQ)")
        right.lines[-1].set_label(f"step {step}")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
