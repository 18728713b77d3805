"""hessext inside curvlinops and laplace-torch, side by side in one run (2 threads).

1. curvlinops' Hessian operator, a product with 1 and with 16 columns, hessext-backed
   (hessext.integrations.curvlinops.HessianLinearOperator) against curvlinops' own (eager: curvlinops
   3.0.1 has no torch.compile path), on [784,256,256,10] ReLU/cross-entropy N=256 and [2,50,50,50,1]
   Tanh/MSE N=1024, float64 and float32. Each result is checked against curvlinops' first.
2. laplace-torch's `Laplace(model, "classification", hessian_structure="diag" | "kron").fit` on a
   [784,256,256,10] Tanh classifier over 2048 samples (batches of 128), with hessext's backend
   (HessextGGN) against laplace-torch's default (CurvlinopsGGN), each in a fresh process for its peak
   memory (the rise of VmHWM over the fit); `hessian_structure="full"` is P^2 = 7.3e10 entries there:
   the call hessext's backend refuses up front is recorded with its message.

    python benchmarks/integrations.py   ->   benchmarks/results/integrations_cpu.{json,md}"""

import json
import subprocess
import sys
import time

import torch
import torch.nn as nn

from common import environment, median_s, mlp, write

NETS = [([784, 256, 256, 10], 256, nn.ReLU, "ce"), ([2, 50, 50, 50, 1], 1024, nn.Tanh, "mse")]


def operator_rows():
    from curvlinops import HessianLinearOperator

    from hessext.integrations import curvlinops as hc

    rows = []
    for widths, n, act, loss_name in NETS:
        for dtype in (torch.float64, torch.float32):
            torch.manual_seed(0)
            model = mlp(widths, act).to(dtype)
            x = torch.randn(n, widths[0], dtype=dtype)
            if loss_name == "ce":
                loss, y = nn.CrossEntropyLoss(), torch.randint(0, widths[-1], (n,))
            else:
                loss, y = nn.MSELoss(), torch.randn(n, widths[-1], dtype=dtype)
            params = list(model.parameters())
            ours = hc.HessianLinearOperator(model, loss, params, [(x, y)], check_deterministic=False)
            ref = HessianLinearOperator(model, loss, params, [(x, y)], check_deterministic=False)
            for K in (1, 16):
                V = torch.randn(ours.shape[1], K, dtype=dtype)
                expected = ref @ V
                error = float((ours @ V - expected).abs().max() / expected.abs().max())
                assert error <= (1e-10 if dtype == torch.float64 else 1e-4), f"{widths} K={K}: {error:.1e}"
                ms = {
                    name: median_s(lambda op=op: op @ V, 1.0) * 1e3
                    for name, op in (("hessext", ours), ("curvlinops", ref))
                }
                row = {
                    "task": f"Hessian matmat, {widths} {act.__name__}/{loss_name.upper()}, N={n}",
                    "dtype": str(dtype)[6:],
                    "K": K,
                    "hessext": ms["hessext"],
                    "peer": ms["curvlinops"],
                    "x": ms["curvlinops"] / ms["hessext"],
                    "error": error,
                }
                rows.append(row)
                print(row, flush=True)
    return rows


FIT = """
import json, resource, sys, time, torch, torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
sys.path.insert(0, {bench!r})
from common import mlp
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from hessext.integrations.laplace import HessextGGN
torch.set_num_threads(2)
torch.manual_seed(0)
model = mlp([784, 256, 256, 10]).double()
X, y = torch.randn(2048, 784, dtype=torch.float64), torch.randint(0, 10, (2048,))
loader = DataLoader(TensorDataset(X, y), batch_size=128)
def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))
backend = {{"hessext": HessextGGN, "laplace": CurvlinopsGGN}}[{method!r}]
base = status("VmRSS:")
start = time.perf_counter()
where = "Laplace(...)"  # laplace-torch's constructor allocates the P x P precision of a full structure
try:
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure={structure!r}, backend=backend)
    where = "fit"
    la.fit(loader)
    out = {{"seconds": time.perf_counter() - start, "peak_mb": (status("VmHWM:") - base) / 1024,
            "lml": la.log_marginal_likelihood().item(),
            "precision": la.posterior_precision.sum().item() if {structure!r} != "kron" else None}}
except (ValueError, RuntimeError, MemoryError) as exc:
    out = {{"failed": where + ": " + str(exc).splitlines()[0][:200]}}
print(json.dumps(out))
"""


def fit(method, structure):
    import os

    code = FIT.format(bench=os.path.dirname(os.path.abspath(__file__)), method=method, structure=structure)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"failed": (done.stderr.strip().splitlines() or ["exit status %d" % done.returncode])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def laplace_rows():
    rows = []
    for structure in ("diag", "kron", "full"):
        ours = fit("hessext", structure)
        peer = fit("laplace", structure) if structure != "full" else {"failed": "not run: the same P^2 entries"}
        row = {
            "task": f"Laplace fit, hessian_structure={structure!r}, [784,256,256,10] Tanh/CE, 2048 samples",
            "dtype": "float64",
            "K": None,
            "hessext": ours.get("seconds", float("nan")) * 1e3,
            "peer": peer.get("seconds", float("nan")) * 1e3,
            "hessext_peak_mb": ours.get("peak_mb"),
            "peer_peak_mb": peer.get("peak_mb"),
            "failed": "; ".join(
                f"{k}: {v['failed']}" for k, v in (("hessext", ours), ("laplace-torch", peer)) if "failed" in v
            )
            or None,
        }
        if "seconds" in ours and "seconds" in peer:
            row["x"] = peer["seconds"] / ours["seconds"]
            which = "precision" if ours["precision"] is not None else "lml"  # kron: the marginal likelihood
            row["error"] = abs(ours[which] - peer[which]) / abs(peer[which])
        rows.append(row)
        print(row, flush=True)
    return rows


def main():
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows = operator_rows() + laplace_rows()
    columns = [
        ("task", "task", "{}"),
        ("dtype", "dtype", "{}"),
        ("K", "columns", "{}"),
        ("hessext", "hessext-backed (ms)", "{:.1f}"),
        ("peer", "curvlinops' own / laplace-torch's default (ms)", "{:.1f}"),
        ("x", "x faster", "{:.1f}"),
        ("error", "relative difference", "{:.1e}"),
        ("hessext_peak_mb", "peak, hessext (MB)", "{:.0f}"),
        ("peer_peak_mb", "peak, default (MB)", "{:.0f}"),
        ("failed", "could not run", "{}"),
    ]
    notes = [
        "Medians (the Laplace fits: one each, in a fresh process). Relative difference: of the product (max "
        "over entries), of the posterior precision's sum, or (kron) of the log marginal likelihood. "
        "laplace-torch's default backend is CurvlinopsGGN, "
        f"whose GGN diagonal builds each batch's per-sample Jacobians. Run took {time.perf_counter() - start:.0f} s."
    ]
    print(write("integrations_cpu", environment(), rows, columns, notes))


if __name__ == "__main__":
    main()
