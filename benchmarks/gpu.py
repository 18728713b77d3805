"""GPU benchmark (issue targets), side by side in one run, float32 on one GPU: hessext against
torch.func eager, torch.func under torch.compile (compile time reported apart), autograd double
backward and BackPACK (diagonals), with peak memory; plus, for the wide stack, the matrix-product
bound: the GEMMs the R-operator needs (forward 1, delta 1, R-forward 2, R-backward 4 per layer;
3 for the first) timed one by one with cuBLAS in the same run.

    python benchmarks/gpu.py --out DIR   ->   DIR/gpu_bench.{json,md}"""

import argparse
import json
import os

import torch
from torch.utils.benchmark import Timer

from hessext import bench

CONFIGS = [  # (name, widths, N, quantities)
    ("a", [1, 16, 1], 100, ["hvp", "diagonal", "hessian"]),
    ("b", [2, 50, 50, 50, 1], 4096, ["hvp"]),
    ("c", [1024, 4096, 4096, 1024], 4096, ["hvp"]),
]


def matmul_bound_s(widths, N, dtype):
    """Seconds of the GEMMs one HVP needs, each timed alone with cuBLAS."""
    dev = torch.device("cuda")
    total = 0.0
    for layer, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        # (m, k, n) of each product: z = a W^T, Rz += a V^T, (Hv)_W = Rdelta^T a; beyond the first layer also
        # Rz += Ra W^T, e = delta W, Re = Rdelta W + delta V, (Hv)_W += Ra^T delta
        shapes = [(N, i, o), (N, i, o), (o, N, i)]
        if layer > 0:
            shapes += [(N, i, o), (N, o, i), (N, o, i), (N, o, i), (i, N, o)]
        for m, k, n in shapes:
            a = torch.randn(m, k, device=dev, dtype=dtype)
            b = torch.randn(k, n, device=dev, dtype=dtype)
            timer = Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
            total += timer.blocked_autorange(min_run_time=0.2).median
    return total


def write(reports, out):
    """The JSON and markdown record of the configs measured so far (rewritten after each one)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_bench.json"), "w") as f:
        json.dump(reports, f, indent=2)
    lines = []
    for report in reports:
        lines.append(bench.markdown(report))
        if "matmul_bound_s" in report:
            hx = report["cases"][0]["methods"]["hessext"].get("median_s")
            lines.append(
                f"Matrix-product bound: {report['matmul_bound_s'] * 1e3:.3f} ms; hessext / bound = "
                f"{hx / report['matmul_bound_s']:.2f}\n"
                if hx
                else "hessext was not timed\n"
            )
    with open(os.path.join(out, "gpu_bench.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    reports = []
    for name, widths, N, quantities in CONFIGS:
        methods = ["hessext", "torch.func", "torch.compile", "double-backward", "backpack"]
        report = bench.run(
            quantities,
            [widths],
            [N],
            methods,
            device="cuda",
            dtype=torch.float32,
            k=16,
            min_run_time=1.0,
            progress=False,
        )
        report["config"] = name
        if name == "c":
            report["matmul_bound_s"] = matmul_bound_s(widths, N, torch.float32)
        reports.append(report)
        print(bench.format_table(report), flush=True)
        write(reports, args.out)


if __name__ == "__main__":
    main()
