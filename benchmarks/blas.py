"""The CPU matrix products the kernels use, measured per shape (float64, 2 threads): ATen's
torch.mm (MKL) against hessext's OpenBLAS (csrc/gemm.h) with the kernels this environment gives it
and with each kernel set asked for by HESSEXT_OPENBLAS_CORETYPE (each in a process of its own, as the
choice is read when the library loads); then hessext's products on one thread (as inside a row or
vector block) with and without the row pieces for OpenBLAS's small-matrix path (csrc/cpu/gemm.cpp).
Shapes: the products of the HVP recurrence of the benchmark nets ([N, i] x [i, o] forward and
R-forward, [o, N] x [N, i] weight products, [N K, i] x [i, o] for K vectors).

    python benchmarks/blas.py   ->   benchmarks/results/blas_cpu.{json,md}"""

import json
import os
import subprocess
import sys

import torch

from common import environment, write

SHAPES = [
    (256, 784, 256),
    (256, 256, 256),
    (256, 256, 10),
    (256, 256, 784),
    (1024, 50, 50),
    (50, 1024, 50),
    (256, 64, 64),
    (1024, 64, 64),
    (64, 256, 64),
    (4096, 50, 50),
    (768, 768, 13312),
]
CORETYPES = ["Haswell", "SkylakeX"]


def rates(which, pieces=True):
    """GFLOP/s per shape of `which` ("aten" or "hessext") in this process, each product into an output
    allocated beforehand; pieces: hessext's row pieces on or off."""
    from speed import median

    from hessext import _native

    C = _native.load()
    C.set_row_pieces(pieces)
    out = {}
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
        c = torch.empty(m, n, dtype=torch.float64)
        fn = (lambda: torch.mm(a, b, out=c)) if which == "aten" else (lambda: C.mm_into(c, a, b))
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / median(fn, repeat=20 if m * k * n > 10**8 else 100) / 1e9
    return out


def main():
    torch.set_num_threads(2)
    if len(sys.argv) > 1:  # child: one kernel set
        print(json.dumps(rates("hessext")))
        return
    from hessext import _native

    columns = {
        "ATen (MKL)": rates("aten"),
        f"hessext: {_native.status()['blas']['name'].split(' (')[0]}": rates("hessext"),
    }
    for core in CORETYPES:
        env = dict(os.environ, HESSEXT_OPENBLAS_CORETYPE=core)
        done = subprocess.run([sys.executable, __file__, "child"], capture_output=True, text=True, env=env, check=True)
        columns[f"HESSEXT_OPENBLAS_CORETYPE={core}"] = json.loads(done.stdout.strip().splitlines()[-1])
    torch.set_num_threads(1)
    columns["hessext, 1 thread, whole"] = rates("hessext", pieces=False)
    columns["hessext, 1 thread, row pieces"] = rates("hessext")
    torch.set_num_threads(2)
    rows = [{"shape": s, **{name: col[s] for name, col in columns.items()}} for s in columns["ATen (MKL)"]]
    env = environment()
    env["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")
    print(
        write(
            "blas_cpu",
            env,
            rows,
            [("shape", "[m x k x n]", "{}")] + [(n, n + " GFLOP/s", "{:.1f}") for n in columns],
            [
                f"OPENBLAS_CORETYPE in this environment: {env['OPENBLAS_CORETYPE']}. Medians of float64 products, "
                "2 threads (hessext splits each product over torch's threads; OpenBLAS itself runs one thread), "
                "except the last two columns: one thread, each product whole or in row pieces of at most 10^6 "
                "multiply-adds (the default where OpenBLAS has SkylakeX kernels)."
            ],
        )
    )


if __name__ == "__main__":
    main()
