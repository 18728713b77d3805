"""Top eigenvalues, trace and spectral density of the Hessian against PyHessian, same net and data
in one run: [784,256,256,10] Tanh MLP, MSE, N=256 (P = 269,322), 2 threads. PyHessian runs in
float32 (its random vectors are float32, so a float64 model fails in its products); hessext runs in
float32 and float64. Accuracy is against a float64 reference: eigsh at tol 1e-11 (its residuals bound
the eigenvalue errors), and the exact trace from hessext's exact Hessian diagonal.

    python benchmarks/spectrum.py   ->   benchmarks/results/spectrum_cpu.{json,md}"""

import copy
import statistics
import time

import torch

import hessext
from common import environment, mlp, write
from hessext import linalg

REPEATS = 3


class Counted:
    """An operator that counts the Hessian-vector products (columns) it is asked for."""

    def __init__(self, H):
        self.H, self.shape, self.dtype, self.device, self.products = H, H.shape, H.dtype, H.device, 0

    def __matmul__(self, V):
        self.products += V.shape[1] if V.dim() == 2 else 1
        return self.H @ V


def timed(fn):
    """(median seconds over REPEATS, the last result)."""
    times, result = [], None
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model64 = mlp([784, 256, 256, 10]).double()
    x64, y64 = torch.randn(256, 784, dtype=torch.float64), torch.randn(256, 10, dtype=torch.float64)
    model32, x32, y32 = copy.deepcopy(model64).float(), x64.float(), y64.float()
    loss = torch.nn.MSELoss()
    H64 = hessext.HessianOperator(model64, loss, (x64, y64))
    H32 = hessext.HessianOperator(model32, loss, (x32, y32))
    ref, _ = linalg.eigsh(H64, k=5, tol=1e-11, max_iter=3000, generator=torch.Generator().manual_seed(1))
    exact_trace = sum(d.sum() for d in hessext.hessian_diag(model64, loss, x64, y64).values()).item()
    rows, notes = [], []

    def eig_row(method, seconds, values, products):
        values = torch.as_tensor(sorted(values, reverse=True), dtype=torch.float64)
        rows.append(
            {
                "task": "top-5 eigenvalues",
                "method": method,
                "seconds": seconds,
                "products": products,
                "error": ((values - ref).abs() / ref.abs()).max().item(),
            }
        )

    for dtype, H, tol, criterion, block in (
        (torch.float64, H64, 1e-8, "residual", None),
        (torch.float64, H64, 1e-4, "residual", None),
        (torch.float32, H32, 1e-5, "residual", None),
        (torch.float64, H64, 1e-3, "values", None),
        (torch.float32, H32, 1e-3, "values", None),
        (torch.float32, H32, 1e-2, "values", None),  # about PyHessian's default accuracy
        (torch.float32, H32, 2e-2, "values", 2),  # the same, in blocks of 2: fewer products
    ):

        def call(op):
            return linalg.eigsh(
                op, k=5, tol=tol, criterion=criterion, block_size=block, generator=torch.Generator().manual_seed(2)
            )

        counter = Counted(H)
        seconds, (values, _) = timed(lambda: call(H))
        call(counter)
        eig_row(
            f"hessext eigsh {str(dtype)[6:]} tol={tol:g}"
            + (", criterion='values'" if criterion == "values" else "")
            + (f", block_size={block}" if block else ""),
            seconds,
            values.tolist(),
            counter.products,
        )
    try:
        from pyhessian import hessian as PyHessian
    except ImportError:
        PyHessian = None
        notes.append("- PyHessian not installed (pip install pyhessian): its rows are missing.")
    if PyHessian is not None:
        ph = PyHessian(copy.deepcopy(model32), loss, data=(x32, y32), cuda=False)
        seconds, (values, _) = timed(lambda: ph.eigenvalues(top_n=5, maxIter=100, tol=1e-3))
        eig_row("PyHessian eigenvalues(top_n=5) float32", seconds, values, None)
        start = time.perf_counter()  # at its tightest useful setting, once (it takes long)
        values, _ = ph.eigenvalues(top_n=5, maxIter=1000, tol=1e-7)
        eig_row(
            "PyHessian eigenvalues(top_n=5, maxIter=1000, tol=1e-7) float32", time.perf_counter() - start, values, None
        )

    for samples in (30, 99):
        for name, H in (("float64", H64), ("float32", H32)):
            errors, times = [], []
            for seed in range(5):
                start = time.perf_counter()
                estimate = linalg.trace(H, samples=samples, generator=torch.Generator().manual_seed(seed))
                times.append(time.perf_counter() - start)
                errors.append(abs(estimate - exact_trace) / abs(exact_trace))
            rows.append(
                {
                    "task": "trace",
                    "method": f"hessext trace(samples={samples}) {name}, Hutch++",
                    "seconds": statistics.median(times),
                    "products": samples,
                    "error": statistics.mean(errors),
                }
            )
        if PyHessian is not None:
            errors, times = [], []
            for seed in range(5):
                torch.manual_seed(seed)
                start = time.perf_counter()
                estimates = ph.trace(maxIter=samples, tol=0.0)
                times.append(time.perf_counter() - start)
                errors.append(abs(statistics.mean(estimates) - exact_trace) / abs(exact_trace))
            rows.append(
                {
                    "task": "trace",
                    "method": f"PyHessian trace(maxIter={samples}) float32, Hutchinson",
                    "seconds": statistics.median(times),
                    "products": samples,
                    "error": statistics.mean(errors),
                }
            )

    seconds, (grid, dens) = timed(
        lambda: linalg.density(H64, num_steps=100, samples=1, generator=torch.Generator().manual_seed(3))
    )
    mean = torch.trapezoid(grid * dens, grid).item() * H64.shape[0]
    rows.append(
        {
            "task": "density (100 Lanczos steps, 1 probe)",
            "method": "hessext density float64",
            "seconds": seconds,
            "products": 100,
            "error": abs(mean - exact_trace) / abs(exact_trace),
        }
    )
    if PyHessian is not None:
        torch.manual_seed(3)
        try:
            seconds, (nodes, weights) = timed(lambda: ph.density(iter=100, n_v=1))
            implied = sum(n * w for n, w in zip(nodes[0], weights[0])) * H64.shape[0]
            rows.append(
                {
                    "task": "density (100 Lanczos steps, 1 probe)",
                    "method": "PyHessian density float32",
                    "seconds": seconds,
                    "products": 100,
                    "error": abs(implied - exact_trace) / abs(exact_trace),
                }
            )
        except RuntimeError as exc:  # its density calls torch.eig, removed from torch in 2.0
            notes.append(f"- PyHessian density() fails on torch {torch.__version__}: {str(exc).splitlines()[0][:110]}")
    env = environment()
    print(
        write(
            "spectrum_cpu",
            env,
            rows,
            [
                ("task", "task", "{}"),
                ("method", "method", "{}"),
                ("seconds", "median (s)", "{:.3f}"),
                ("products", "Hessian-vector products", "{}"),
                ("error", "relative error", "{:.1e}"),
            ],
            [
                f"- Reference top-5 eigenvalues (float64 eigsh, tol 1e-11): {[round(v, 6) for v in ref.tolist()]}; "
                f"exact trace {exact_trace:.6f} (sum of hessext's exact Hessian diagonal).",
                "- Trace errors: mean over 5 seeds. Density error: the trace its first moment implies (for one "
                "probe this is that probe's Hutchinson estimate).",
                f"- Medians of {REPEATS} runs (eigenvalues, density) or of 5 seeds (trace).",
            ]
            + notes,
        )
    )


if __name__ == "__main__":
    main()
