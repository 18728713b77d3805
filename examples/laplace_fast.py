"""A Laplace approximation (laplace-torch) with hessext's exact curvature.

Fits `Laplace(model, "classification", hessian_structure="diag")` (or "kron") for a Tanh MLP
[50,128,128,10] on 2,048 random points in batches of 256, once with laplace-torch's curvlinops GGN
backend and once with hessext's (hessext.integrations.laplace.HessextGGN: the exact GGN diagonal
without per-sample Jacobians; for "kron", the Kronecker factors of hessext.kfac_factors), and prints
the time of each fit, the log marginal likelihood and the largest difference between the posterior
precisions.

    pip install laplace-torch
    python examples/laplace_fast.py [--points 2048] [--structure diag|kron]"""

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
    parser.add_argument("--structure", choices=["diag", "kron"], default="diag")
    args = parser.parse_args()
    n = args.points
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)).double()
    X, y = torch.randn(n, 50, dtype=torch.float64), torch.randint(0, 10, (n,))
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    precision = {}
    for name, backend in (("laplace-torch (curvlinops GGN)", CurvlinopsGGN), ("hessext (HessextGGN)", HessextGGN)):
        la = Laplace(
            model, "classification", subset_of_weights="all", hessian_structure=args.structure, backend=backend
        )
        start = time.perf_counter()
        la.fit(loader)
        seconds = time.perf_counter() - start
        # kron: the curvature's Kronecker factors, each layer's (the dense precision would be P x P)
        precision[name] = (
            la.posterior_precision
            if args.structure == "diag"
            else torch.cat([f.reshape(-1) for fs in la.H_facs.kfacs for f in fs])
        )
        print(f"{name:32s} fit {seconds:6.2f} s   log marginal likelihood {la.log_marginal_likelihood().item():.6f}")
    a, b = precision.values()
    what = "posterior precisions" if args.structure == "diag" else "Kronecker factors"
    print(f"largest difference between the {what}: {(a - b).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
