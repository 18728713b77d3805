"""The CPU matrix products the kernels can use, measured per shape, float64 and float32, 2 threads,
side by side in one run: ATen's torch.mm (torch's MKL), each BLAS library hessext finds (OpenBLAS,
MKL, BLIS; hessext/_blas.py), each run through the kernels' own product (csrc/gemm.cpp: one
single-threaded call per thread's block, OpenBLAS's row pieces), and XLA's dot under jax.jit (in a
process of its own), with the library hessext chose for each shape's class. Shapes: the products of
the HVP recurrence of the benchmark nets ([N, i] x [i, o] forward and R-forward, [o, N] x [N, i]
weight products, [N K, i] x [i, o] for K vectors).

    python benchmarks/blas.py [--isa avx2]   ->   benchmarks/results/blas_cpu[_avx2].{json,md}"""

import torch

from common import environment, hold_isa, median, serving, write, xla_product_s

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
    (16384, 50, 50),
    (100, 16, 16),
]
DTYPES = ["float64", "float32"]


def rates(dtype, library):
    """GFLOP/s per shape through the kernels' product with `library` (a loaded library's index; -1:
    ATen through the kernels' fallback) serving every class, or torch.mm itself (None)."""
    from hessext import _native

    C = _native.load()
    out = {}
    with serving(library if library is not None else -1, dtype):
        for m, k, n in SHAPES:
            a, b = torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(k, n, dtype=getattr(torch, dtype))
            c = torch.empty(m, n, dtype=a.dtype)
            fn = (lambda: torch.mm(a, b, out=c)) if library is None else (lambda: C.mm_into(c, a, b))
            out[f"{m}x{k}x{n}"] = 2 * m * k * n / median(fn, repeat=20 if m * k * n > 10**8 else 100) / 1e9
    return out


def main():
    held = hold_isa()
    torch.set_num_threads(2)
    from hessext import _blas, _native

    C = _native.load()
    status = _blas.status()
    rows = []
    for dtype in DTYPES:
        columns = {"ATen": rates(dtype, None)}
        for name in status["libraries"]:
            columns[name] = rates(dtype, C.blas_names().index(name))
        xla = xla_product_s(SHAPES, dtype)
        columns["XLA (jax.jit)"] = {f"{m}x{k}x{n}": 2 * m * k * n / t / 1e9 for (m, k, n), t in xla.items()}
        for m, k, n in SHAPES:
            shape = f"{m}x{k}x{n}"
            chosen = status["choice"].get(f"{dtype} {_blas.CLASSES[C.product_class(m, k, n)]}", "ATen")
            row = {"dtype": dtype, "shape": shape, "hessext's choice": chosen}
            row.update({name: col.get(shape) for name, col in columns.items()})
            best = max((v, k) for k, v in row.items() if k in columns and v is not None)
            row["fastest"] = best[1]
            row["choice / fastest"] = row.get(chosen, columns["ATen"][shape]) / best[0]
            rows.append(row)
    env = environment()
    env["blas"] = status
    names = ["ATen"] + status["libraries"] + ["XLA (jax.jit)"]
    print(
        write(
            "blas_cpu" + (f"_{held}" if held else ""),
            env,
            rows,
            [("dtype", "dtype", "{}"), ("shape", "[m x k x n]", "{}")]
            + [(n, n + " GFLOP/s", "{:.1f}") for n in names]
            + [
                ("hessext's choice", "hessext's choice", "{}"),
                ("choice / fastest", "its rate / the fastest", "{:.2f}"),
            ],
            [
                "Medians at 2 threads, each product into an output allocated beforehand. The libraries run "
                "through hessext's product (one single-threaded call per thread's block; OpenBLAS's row pieces "
                "where it has SkylakeX kernels); ATen is torch.mm; XLA is jnp.dot under jax.jit (its own "
                "threads). hessext's choice: the library measured fastest for the shape's dtype and class "
                "(narrow: middle dimension <= 128) when hessext loaded (hessext/_blas.py)."
            ],
        )
    )


if __name__ == "__main__":
    main()
