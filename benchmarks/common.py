"""Shared benchmark helpers: the configurations, medians with torch.utils.benchmark.Timer, the
environment record, and the JSON + markdown writers for benchmarks/results/."""

import contextlib
import datetime
import json
import os
import platform
import subprocess
import time

import torch
import torch.nn as nn
from torch.utils.benchmark import Timer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def mlp(widths, act=nn.Tanh):
    layers = []
    for j, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(i, o))
        if j < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def sequential_tiny_tanh():
    """The 1-16-1 network's architecture as an nn.Sequential (for peers that need one), output [N, 1]."""
    return mlp([1, 16, 1])


class TinyTanh(nn.Module):
    """The 1-16-1 network's Linear(1,16)-Tanh-Linear(16,1) with a squeezed output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.af = nn.Linear(1, 16), nn.Linear(16, 1), nn.Tanh()

    def forward(self, x):
        return self.fc2(self.af(self.fc1(x))).squeeze(-1)


def config(name, dtype=torch.float64, device="cpu", seed=0):
    """(label, model, inputs, targets) for a named configuration: "a" [1,16,1] N=100, "b"
    [2,50,50,50,1] N=1024, "c" [784,256,256,10] N=256, "b4096" [2,50,50,50,1] N=4096,
    "d" [10,64,64,1] N=256."""
    torch.manual_seed(seed)
    table = {
        "a": ("[1,16,1], N=100", TinyTanh, 100, 1, (100,)),
        "b": ("[2,50,50,50,1], N=1024", lambda: mlp([2, 50, 50, 50, 1]), 1024, 2, (1024, 1)),
        "c": ("[784,256,256,10], N=256", lambda: mlp([784, 256, 256, 10]), 256, 784, (256, 10)),
        "d": ("[10,64,64,1], N=256", lambda: mlp([10, 64, 64, 1]), 256, 10, (256, 1)),
    }
    label, make, n, d, yshape = table[name]
    model = make().to(dtype=dtype, device=device)
    x = torch.randn(n, d, dtype=dtype, device=device)
    y = torch.randn(yshape, dtype=dtype, device=device)
    return label, model, x, y


def flat_loss(model, loss_fn, x, y):
    """(f, theta): the loss as a function of the flat parameter vector, for torch.func.hessian."""
    from torch.func import functional_call

    params = {k: p.detach() for k, p in model.named_parameters()}
    shapes = [(n, p.shape, p.numel()) for n, p in params.items()]

    def f(flat):
        split, start = {}, 0
        for n, shape, k in shapes:
            split[n] = flat[start : start + k].reshape(shape)
            start += k
        return loss_fn(functional_call(model, split, (x,)), y)

    return f, torch.cat([p.reshape(-1) for p in params.values()])


def median_s(fn, min_run_time=1.0):
    """Median seconds of fn() (warm-up first; Timer synchronises CUDA)."""
    fn()
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())  # Timer's default is 1 thread
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median


ISA_ENV = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "_HESSEXT_HELD_ISA": "avx2",
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
    }
}


def hold_isa():
    """`--isa avx2` on a benchmark's command line: run it again in a process held to AVX2 (torch's and
    hessext's kernels, hessext's OpenBLAS, MKL, and XLA for the JAX peer), so that an AVX-512 machine
    shows the AVX2 picture. Returns the held instruction set, or None; removes the flag from sys.argv."""
    import sys

    if "--isa" not in sys.argv:
        return os.environ.get("_HESSEXT_HELD_ISA")
    j = sys.argv.index("--isa")
    isa = sys.argv[j + 1] if j + 1 < len(sys.argv) else None
    if isa not in ISA_ENV:
        raise SystemExit(f"--isa must be one of {sorted(ISA_ENV)}, got {isa!r}")
    argv = sys.argv[:j] + sys.argv[j + 2 :]
    if os.environ.get("_HESSEXT_HELD_ISA") == isa:
        sys.argv[:] = argv
        return isa
    env = dict(os.environ)
    # torch.compile's cache does not key on the CPU capability: a kernel compiled held to AVX2 and
    # reused in an unheld process gave a 16% wrong HVP (torch 2.13), and unheld kernels reused in the
    # held run gave NaN, so the held run keeps its own (always: importing torch's inductor sets
    # TORCHINDUCTOR_CACHE_DIR in this process before this point)
    import getpass
    import tempfile

    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{isa}")
    for key, value in ISA_ENV[isa].items():
        env[key] = f"{env[key]} {value}" if key == "XLA_FLAGS" and env.get(key) else value
    os.execve(sys.executable, [sys.executable] + argv, env)


def median(fn, repeat=30):
    """Median seconds of `repeat` calls of fn after one warm-up (a plain clock: for the floors' products)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeat // 2]


def product_s(m, k, n, dtype=torch.float64, repeat=30):
    """The fastest of hessext's BLAS libraries (each loaded one, hessext/_blas.py) and ATen for one
    [m, k] x [k, n] product, computed as is or transposed ([n, k] x [k, m]), each into an output
    allocated beforehand (a fresh output of some MB would time its page faults, not the product): with
    xla_product_s, the floors' product time."""
    from hessext import _native

    C = _native.load()
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    c, ct = torch.empty(m, n, dtype=dtype), torch.empty(n, m, dtype=dtype)
    best = []
    for library in range(-1, len(C.blas_names())):
        with serving(library, dtype):
            best += [median(lambda: C.mm_into(c, a, b), repeat), median(lambda: C.mm_into(ct, b.t(), a.t()), repeat)]
    return min(best + [median(lambda: torch.mm(a, b, out=c), repeat)])


@contextlib.contextmanager
def serving(library, dtype):
    """hessext's products of `dtype` on one loaded library (its index in hessext._C.blas_names(); -1:
    ATen) for every product class, the choice restored afterwards."""
    from hessext import _native

    C, is_double = _native.load(), dtype in (torch.float64, "float64")
    old = [C.blas_choose(is_double, cls, library) for cls in (0, 1)]
    try:
        yield
    finally:
        for cls in (0, 1):
            C.blas_choose(is_double, cls, old[cls])


XLA_CHILD = """
import json, sys, time
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
shapes, dtype = json.loads(sys.argv[1]), sys.argv[2]
dot = jax.jit(jnp.dot)
out = []
for m, k, n in shapes:
    a = jnp.asarray(np.random.randn(m, k).astype(dtype))
    b = jnp.asarray(np.random.randn(k, n).astype(dtype))
    dot(a, b).block_until_ready()
    times = []
    for _ in range(15):
        reps, start = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - start < 0.005:
            dot(a, b).block_until_ready()
            reps += 1
        times.append((time.perf_counter() - start) / reps)
    out.append(sorted(times)[len(times) // 2])
print(json.dumps(out))
"""


def xla_product_s(shapes, dtype="float64"):
    """{(m, k, n): median seconds} of XLA's dot under jax.jit for each [m, k] x [k, n] product (in a
    process of its own, held to the same instruction set), or {} without JAX."""
    import sys

    shapes = sorted(set(map(tuple, shapes)))
    done = subprocess.run(
        [sys.executable, "-c", XLA_CHILD, json.dumps(shapes), str(dtype).replace("torch.", "")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode:
        return {}
    return dict(zip(shapes, json.loads(done.stdout.strip().splitlines()[-1])))


def instruction_set():
    """The vector instructions hessext's CPU kernels were compiled for here (AVX-512, AVX2, ...)."""
    from hessext import _native

    native = _native.load()
    return native.simd() if native is not None else None


def product_rate(n=256):
    """GFLOP/s of a float64 [n, n] x [n, n] product with torch.mm at the current thread count: the
    machine's product rate, which the timings of a run are to be read against."""
    a, b = torch.randn(n, n, dtype=torch.float64), torch.randn(n, n, dtype=torch.float64)
    return 2 * n**3 / median_s(lambda: torch.mm(a, b), 0.3) / 1e9


def environment():
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(RESULTS)
        ).stdout.strip()
    except OSError:
        commit = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "isa": instruction_set(),
        "product_gflops": product_rate(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "git_commit": commit,
    }


def write(name, env, rows, columns, notes=()):
    """rows: list of dicts; columns: [(key, header, format)]. Writes results/<name>.json and .md."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=2)
    rate = f", float64 products at {env['product_gflops']:.1f} GFLOP/s" if env.get("product_gflops") else ""
    lines = [
        f"Measured {env['date']} on {env['cpu']} ({env.get('isa') or 'unknown'} instructions{rate}, "
        f"{env['threads']} threads), torch {env['torch']}, commit {env['git_commit']}. Medians of "
        "torch.utils.benchmark.Timer.",
        "",
    ]
    lines.append("| " + " | ".join(h for _, h, _ in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append(
            "| " + " | ".join(fmt.format(row[k]) if row.get(k) is not None else "n/a" for k, _, fmt in columns) + " |"
        )
    lines += [""] + list(notes)
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)
