"""A Laplace approximation (laplace-torch) with hessext's exact curvature.

Fits `Laplace(model, "classification", hessian_structure="diag")` for a Tanh MLP [50,128,128,10] on
2,048 random points in batches of 256, once with laplace-torch's curvlinops GGN backend and once with
hessext's (hessext.integrations.laplace.HessextGGN: the exact GGN diagonal without per-sample
Jacobians), and prints the time of each fit, the log marginal likelihood and the largest difference
between the posterior precisions.

    pip install laplace-torch
    python examples/laplace_fast.py [--points 2048]"""

import argparse
import time

import torch
import torch.nn as nn
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch.utils.data import DataLoader, TensorDataset

from hessext.integrations.laplace import HessextGGN


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=2048)
    n = parser.parse_args().points
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)).double()
    X, y = torch.randn(n, 50, dtype=torch.float64), torch.randint(0, 10, (n,))
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    precision = {}
    for name, backend in (("laplace-torch (curvlinops GGN)", CurvlinopsGGN), ("hessext (HessextGGN)", HessextGGN)):
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", backend=backend)
        start = time.perf_counter()
        la.fit(loader)
        seconds = time.perf_counter() - start
        precision[name] = la.posterior_precision
        print(f"{name:32s} fit {seconds:6.2f} s   log marginal likelihood {la.log_marginal_likelihood().item():.6f}")
    a, b = precision.values()
    print(f"largest difference between the posterior precisions: {(a - b).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
