"""`python -m hessext.bench` (or `hessext-bench`): compare second-order methods on your hardware.

Each method is first checked against a float64 reference (a wrong answer is reported, not timed),
then timed with torch.utils.benchmark.Timer (warm-up, CUDA synchronised): median and interquartile
range, peak memory of one call (CUDA max-allocated; the process's resident high-water mark on the CPU,
reset per method), and ratios to hessext and to one plain gradient. Output: a table in the terminal, a
JSON file with the environment, and PNG plots (time against width and against batch size) when
matplotlib is installed.

    python -m hessext.bench --quantities hvp,diagonal --preset tiny --batch 100,1000
    python -m hessext.bench --widths 784,256,256,10 --device cuda --dtype float32 --out r.json --plot r.png"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap
from torch.utils.benchmark import Timer

import hessext
from hessext import _native

QUANTITIES = ("hvp", "hvp-batched", "ggn_vp", "diagonal", "hessian", "input-hessian", "laplacian")
METHODS = ("hessext", "double-backward", "torch.func", "torch.compile", "jax", "backpack", "curvlinops")
PRESETS = {"tiny": [1, 16, 1], "pinn": [2, 50, 50, 50, 1], "mnist": [784, 256, 256, 10]}
DENSE_LIMIT = 3000  # parameters up to which dense references and dense peers are run
RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}


class Skip(Exception):
    """A method that cannot run here; the message is the note shown instead of a time."""


@dataclass
class Problem:
    widths: list
    batch: int
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    v: dict  # one vector, dict name -> tensor
    V: dict  # K vectors, dict name -> [K, *shape]

    @property
    def params(self):
        return {k: p.detach() for k, p in self.model.named_parameters()}

    @property
    def P(self):
        return sum(p.numel() for p in self.model.parameters())


def mse(out, target):
    """The explicit MSE every method sees (torch.func's jvp(grad) fails on F.mse_loss)."""
    return ((out - target) ** 2).mean()


def make_problem(widths, batch, device, dtype, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for j, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(i, o))
        if j < len(widths) - 2:
            layers.append(nn.Tanh())
    torch.manual_seed(seed)
    model = nn.Sequential(*layers).to(device=device, dtype=dtype)
    x = torch.randn(batch, widths[0], generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randn(batch, widths[-1], generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    v = {
        n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        for n, p in model.named_parameters()
    }
    V = {
        n: torch.randn((k,) + p.shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        for n, p in model.named_parameters()
    }
    return Problem(list(widths), batch, model, x, y, v, V)


def as_float64(pb):
    import copy

    to64 = lambda t: t.detach().to(torch.float64)  # noqa: E731
    return Problem(
        pb.widths,
        pb.batch,
        copy.deepcopy(pb.model).to(torch.float64),
        to64(pb.x),
        to64(pb.y),
        {n: to64(t) for n, t in pb.v.items()},
        {n: to64(t) for n, t in pb.V.items()},
    )


def flat(result):
    """Any method's result as one float64 tensor."""
    if isinstance(result, torch.Tensor):
        return result.detach().to(torch.float64).reshape(-1)
    items = result.values() if isinstance(result, dict) else result
    return torch.cat([flat(t) for t in items])


# ---- the methods: builder(problem) -> zero-argument callable ---------------------------------------


def _loss_of(pb):
    return lambda p: mse(functional_call(pb.model, p, (pb.x,)), pb.y)


def _func_hvp(pb, batched):
    f, params = _loss_of(pb), pb.params
    one = lambda u: jvp(grad(f), (params,), (u,))[1]  # noqa: E731
    return (lambda: vmap(one)(pb.V)) if batched else (lambda: one(pb.v))


def _double_backward_hvp(pb, batched):
    plist = list(pb.model.parameters())

    def run():
        g = torch.autograd.grad(mse(pb.model(pb.x), pb.y), plist, create_graph=True)
        vs = list((pb.V if batched else pb.v).values())
        return torch.autograd.grad(g, plist, grad_outputs=vs, is_grads_batched=batched)

    return run


def _func_ggn_vp(pb):
    params = pb.params
    out_fn = lambda p: functional_call(pb.model, p, (pb.x,))  # noqa: E731

    def run():
        out, out_vjp = vjp(out_fn, params)
        Jv = jvp(out_fn, (params,), (pb.v,))[1]
        _, loss_hvp = vjp(grad(lambda o: mse(o, pb.y)), out)
        return out_vjp(loss_hvp(Jv)[0])[0]

    return run


def _func_flat_hessian(pb):
    params = pb.params
    shapes = [(n, p.shape, p.numel()) for n, p in params.items()]
    theta = torch.cat([p.reshape(-1) for p in params.values()])

    def f(t):
        split, start = {}, 0
        for n, shape, k in shapes:
            split[n] = t[start : start + k].reshape(shape)
            start += k
        return mse(functional_call(pb.model, split, (pb.x,)), pb.y)

    return lambda: hessian(f)(theta)


def _dense_only(pb, what):
    if pb.P > DENSE_LIMIT:
        raise Skip(f"{what} is dense in P = {pb.P} > {DENSE_LIMIT} parameters")


def _backpack_diag(pb):
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagHessian
    except ImportError:
        raise Skip("BackPACK not installed (pip install backpack-for-pytorch)")
    import copy

    model, loss = extend(copy.deepcopy(pb.model)), extend(nn.MSELoss())

    def run():
        model.zero_grad()
        with backpack(DiagHessian()):
            loss(model(pb.x), pb.y).backward()
        return [p.diag_h for p in model.parameters()]

    return run


def _curvlinops(pb, kind):
    try:
        import curvlinops
    except ImportError:
        raise Skip("curvlinops not installed (pip install curvlinops-for-pytorch)")
    cls = {"hvp": curvlinops.HessianLinearOperator, "ggn_vp": curvlinops.GGNLinearOperator}[kind]
    op = cls(pb.model, nn.MSELoss(), list(pb.model.parameters()), [(pb.x, pb.y)], check_deterministic=False)
    v = torch.cat([t.reshape(-1) for t in pb.v.values()]).cpu().numpy()
    return lambda: torch.as_tensor(op @ v)


class External:
    """A peer timed in a process of its own (JAX: its thread pool and allocator apart from torch's).
    run(min_run_time) -> (result, {"median_s", "iqr_s", "compile_s"})."""

    def __init__(self, module, arrays):
        self.module, self.arrays = module, arrays

    def run(self, min_run_time):
        import tempfile

        import numpy as np

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
            np.savez(src, min_run_time=min_run_time, **self.arrays)
            done = subprocess.run([sys.executable, "-m", self.module, src, dst], capture_output=True, text=True)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                raise RuntimeError(lines[-1] if lines else f"exit status {done.returncode}")
            out = np.load(dst)
            timing = {k: float(out[k]) for k in ("median_s", "iqr_s", "compile_s")}
            return torch.from_numpy(out["result"]), timing


def _jax_peer(quantity):
    """JAX (jit; folx's forward Laplacian) on the same Tanh MLP, data and vectors."""

    def builder(pb):
        import importlib.util

        if pb.x.device.type != "cpu":
            raise Skip("the JAX peer is measured on the CPU only")
        if importlib.util.find_spec("jax") is None:
            raise Skip("JAX not installed (pip install jax)")
        if quantity == "laplacian" and importlib.util.find_spec("folx") is None:
            raise Skip("folx not installed (pip install folx)")
        if quantity in ("diagonal", "hessian"):
            _dense_only(pb, "jax.hessian")
        linears = [m for m in pb.model if isinstance(m, nn.Linear)]
        arrays = {
            "quantity": quantity,
            "layers": len(linears),
            "x": pb.x,
            "y": pb.y,
            "v": flat(pb.v).to(pb.x.dtype),
            "V": torch.cat([t.reshape(t.shape[0], -1) for t in pb.V.values()], 1),
        }  # [K, P], torch's order
        for j, m in enumerate(linears):
            arrays[f"W{j}"], arrays[f"b{j}"] = m.weight, m.bias
        return External(
            "hessext.bench_jax",
            {k: (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t) for k, t in arrays.items()},
        )

    return builder


def _sample_loss(pb):
    n_out = pb.y.numel()
    return lambda xm, ym: ((pb.model(xm[None]) - ym[None]) ** 2).sum() / n_out


def _compiled(build):
    def builder(pb):
        # Compile in this process: inductor's pool of compile workers goes on using the CPU after
        # the compile, which slowed the next methods' timings by up to 1.6x on 2 cores.
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        fn = build(pb)
        return torch.compile(fn)

    return builder


def _func_dense(pb, diagonal):
    _dense_only(pb, "torch.func's Hessian")
    full = _func_flat_hessian(pb)
    return (lambda: torch.diagonal(full())) if diagonal else full


def _not_applicable(method):
    def builder(pb):
        raise Skip(f"no {method} for this quantity")

    return builder


def _func_builders():
    return {
        "hvp": lambda pb: _func_hvp(pb, False),
        "hvp-batched": lambda pb: _func_hvp(pb, True),
        "ggn_vp": _func_ggn_vp,
        "diagonal": lambda pb: _func_dense(pb, True),
        "hessian": lambda pb: _func_dense(pb, False),
        "input-hessian": lambda pb: lambda: vmap(hessian(_sample_loss(pb)))(pb.x, pb.y),
        "laplacian": lambda pb: (
            lambda: torch.diagonal(vmap(jacfwd(jacrev(lambda xm: pb.model(xm[None])[0])))(pb.x), dim1=-2, dim2=-1).sum(
                -1
            )
        ),
    }


def builders():
    """quantity -> method -> builder(problem) -> callable (raising Skip where it does not apply)."""
    func = _func_builders()
    table = {
        "hvp": {
            "hessext": lambda pb: lambda: hessext.hvp(pb.model, mse, pb.x, pb.y, pb.v),
            "double-backward": lambda pb: _double_backward_hvp(pb, False),
            "curvlinops": lambda pb: _curvlinops(pb, "hvp"),
        },
        "hvp-batched": {
            "hessext": lambda pb: lambda: hessext.hvp(pb.model, mse, pb.x, pb.y, pb.V),
            "double-backward": lambda pb: _double_backward_hvp(pb, True),
        },
        "ggn_vp": {
            "hessext": lambda pb: lambda: hessext.ggn_vp(pb.model, mse, pb.x, pb.y, pb.v),
            "curvlinops": lambda pb: _curvlinops(pb, "ggn_vp"),
        },
        "diagonal": {
            "hessext": lambda pb: lambda: hessext.hessian_diag(pb.model, mse, pb.x, pb.y),
            "backpack": _backpack_diag,
        },
        "hessian": {"hessext": lambda pb: lambda: hessext.hessian(pb.model, mse, pb.x, pb.y, output="matrix")},
        # input derivatives evaluated, as the peers evaluate them (in grad mode they carry a gradient)
        "input-hessian": {
            "hessext": lambda pb: torch.no_grad()(lambda: hessext.input_hessian(pb.model, mse, pb.x, pb.y))
        },
        "laplacian": {"hessext": lambda pb: torch.no_grad()(lambda: hessext.laplacian(pb.model, pb.x))},
    }
    for q in QUANTITIES:
        table[q]["torch.func"] = func[q]
        table[q]["torch.compile"] = _compiled(func[q])
        table[q]["jax"] = _jax_peer(q)
        for m in METHODS:
            table[q].setdefault(m, _not_applicable(m))
    return table


# ---- the reference ------------------------------------------------------------------------------


def reference(quantity, pb, seed=0):
    """(float64 reference values, index into the method's flat result or None for all of it)."""
    p64 = as_float64(pb)
    f = lambda v: hessext.hvp(p64.model, mse, p64.x, p64.y, v, backend="torch.func")  # noqa: E731
    if quantity == "hvp":
        return flat(f(p64.v)), None
    if quantity == "hvp-batched":
        return flat(f(p64.V)), None
    if quantity == "ggn_vp":
        return flat(hessext.ggn_vp(p64.model, mse, p64.x, p64.y, p64.v, backend="torch.func")), None
    if quantity in ("diagonal", "hessian"):
        P = pb.P
        rows = torch.randperm(P, generator=torch.Generator().manual_seed(seed))[: min(P, 24)]
        basis = torch.zeros(len(rows), P, dtype=torch.float64, device=pb.x.device)
        basis[torch.arange(len(rows)), rows.to(basis.device)] = 1
        H_rows = f(basis)  # [r, P]: rows of the Hessian
        if quantity == "diagonal":
            return H_rows[torch.arange(len(rows)), rows.to(H_rows.device)], rows
        return H_rows.reshape(-1), (rows[:, None] * P + torch.arange(P)).reshape(-1)
    if quantity == "input-hessian":
        return flat(hessext.input_hessian(p64.model, mse, p64.x, p64.y, backend="torch.func")), None
    return flat(hessext.laplacian(p64.model, p64.x, backend="torch.func")), None


def check(result, ref, index, dtype):
    """(ok, relative error) of a method's result against the reference."""
    got = flat(result)
    if index is not None:
        got = got[index.to(got.device)]
    if got.shape != ref.shape:
        return False, float("inf")
    err = ((got - ref.to(got.device)).abs().max() / ref.abs().max().clamp_min(1e-300)).item()
    return err <= RTOL[dtype], err


# ---- timing and memory --------------------------------------------------------------------------


def _status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def _trim_heap():
    """Return the C heap's free memory to the system (glibc's malloc_trim; nothing elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_mb(fn):
    """The peak resident memory `fn()` adds to the process, in MB: the kernel's high-water mark is reset
    (/proc/self/clear_refs), fn runs once, and the mark is read against the resident memory before.
    None where Linux does not allow the reset."""
    try:
        _trim_heap()  # freed heap memory glibc keeps resident would otherwise hide fn's own allocations
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_mb("VmRSS")
        fn()
        return max(0.0, _status_mb("VmHWM") - before)
    except (OSError, StopIteration, ValueError):
        return None


def measure(fn, device, min_run_time):
    """(median s, interquartile range s, peak memory MB of one call: CUDA max-allocated above what was
    allocated before, or the CPU process's resident high-water mark above its resident memory before)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        fn()
        peak = cpu_peak_mb(fn)
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())  # Timer's default is 1 thread
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median, m.iqr, peak


def environment(device):
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "git_commit": commit,
        "hessext_native": hessext.plan(nn.Linear(1, 1), nn.MSELoss()).backend == "native",
        "cpu_products": _native.status().get("blas", {}).get("name"),
    }


# ---- the run ------------------------------------------------------------------------------------


def run(
    quantities,
    architectures,
    batches,
    methods,
    device="cpu",
    dtype=torch.float64,
    k=16,
    min_run_time=0.2,
    extra_methods=None,
    progress=True,
):
    """Benchmark every (quantity, architecture, batch, method); returns the JSON-ready report."""
    device = torch.device(device)
    table = builders()
    for q, extra in (extra_methods or {}).items():
        table[q].update(extra)
    jobs = [(q, w, n) for q in quantities for w in architectures for n in batches]
    bar = jobs
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(jobs, desc="hessext.bench", unit="case", file=sys.stderr)
        except ImportError:  # the bar is a nicety
            pass
    rows, notes = [], []
    with warnings.catch_warnings():  # peers' own deprecation and hook warnings would bury the table
        warnings.simplefilter("ignore")
        for q, widths, n in bar:
            rows.append(_run_case(q, widths, n, methods, table, extra_methods, device, dtype, k, min_run_time, notes))
    return {
        "environment": environment(device),
        "dtype": str(dtype).replace("torch.", ""),
        "k": k,
        "cases": rows,
        "notes": sorted(set(notes)),
    }


def _run_case(q, widths, n, methods, table, extra_methods, device, dtype, k, min_run_time, notes):
    """One (quantity, architecture, batch): every method checked, then timed."""
    pb = make_problem(widths, n, device, dtype, k)
    ref, index = reference(q, pb)
    plist = list(pb.model.parameters())
    grad_time = measure(lambda: torch.autograd.grad(mse(pb.model(pb.x), pb.y), plist), device, min_run_time)[0]
    case = {"quantity": q, "widths": widths, "batch": n, "P": pb.P, "gradient_s": grad_time, "methods": {}}
    names = list(methods) + [m for m in (extra_methods or {}).get(q, {}) if m not in methods]
    for name in names:
        entry = {"status": "ok"}
        try:
            fn = table[q][name](pb)
            if isinstance(fn, External):
                result, timing = fn.run(min_run_time)
            else:
                start = time.perf_counter()
                result = fn()  # the check's call is also the warm-up, and compiles torch.compile's graph
                first_call = time.perf_counter() - start
            ok, err = check(result, ref, index, dtype)
            entry["rel_error"] = err
            if not ok:
                entry["status"] = "wrong"
                notes.append(f"{q} {widths} N={n}: {name} is wrong (relative error {err:.2e}); not timed")
            elif isinstance(fn, External):
                entry.update(timing)  # timed in its own process; compile time apart, as below
            else:
                if name == "torch.compile":
                    entry["compile_s"] = first_call  # reported apart, never in the median
                entry["median_s"], entry["iqr_s"], entry["peak_mb"] = measure(fn, device, min_run_time)
        except Skip as exc:
            entry = {"status": "skipped", "note": str(exc)}
            notes.append(f"{q}: {name} skipped: {exc}")
        except Exception as exc:  # a peer that fails on this input is reported, not fatal
            entry = {
                "status": "failed",
                "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
            }
            notes.append(f"{q} {widths} N={n}: {name} failed: {entry['note']}")
            _leave_forward_ad()
        case["methods"][name] = entry
    base = case["methods"].get("hessext", {}).get("median_s")
    for entry in case["methods"].values():
        if "median_s" in entry:
            entry["x_gradient"] = entry["median_s"] / grad_time
            entry["x_hessext"] = entry["median_s"] / base if base else None
    return case


def _leave_forward_ad():
    """Exit the forward-mode AD levels a failed peer left entered (torch.compile of a jvp that
    fails while tracing does not exit its level; every later jvp in the process would then raise
    "Nested forward mode AD is not supported")."""
    from torch.autograd import forward_ad

    while forward_ad._current_level >= 0:
        forward_ad.exit_dual_level()


def format_table(report):
    lines = [
        f"{'quantity':14s} {'widths':22s} {'N':>6s} {'method':16s} {'median':>11s} {'iqr':>10s} "
        f"{'x hessext':>10s} {'x grad':>8s} {'peak MB':>9s}"
    ]
    for case in report["cases"]:
        for name, e in case["methods"].items():
            if "median_s" in e:
                cols = (
                    f"{e['median_s'] * 1e3:9.3f}ms {e['iqr_s'] * 1e3:8.3f}ms "
                    f"{(e['x_hessext'] or float('nan')):9.2f}x {e['x_gradient']:7.2f}x "
                    f"{(e.get('peak_mb') or float('nan')):9.1f}"
                )
            else:
                cols = f"{e['status']}: {e.get('note', '')}"[:60]
            lines.append(
                f"{case['quantity']:14s} {','.join(map(str, case['widths'])):22s} {case['batch']:6d} {name:16s} {cols}"
            )
    return "\n".join(lines + [""] + [f"note: {n}" for n in report["notes"]])


def _one_line(text, limit=160):
    """Text for one markdown table cell or list item: whitespace collapsed, pipes escaped, cut at limit."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def markdown(report):
    """The report as a markdown table (one row per case and method)."""
    env = report["environment"]
    lines = [
        f"Measured {env['date']} on {env['device']} ({env['threads']} threads), torch {env['torch']}, "
        f"{report['dtype']}, commit {env['git_commit']}; hessext.bench, medians.",
        "",
        "| quantity | widths | N | method | median (ms) | x hessext | x gradient | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        for name, e in case["methods"].items():
            if e["status"] == "skipped":
                continue
            timed = "median_s" in e
            note = (
                f"compile {e['compile_s']:.1f} s"
                if "compile_s" in e
                else e.get("note", e["status"] if not timed else "")
            )
            note = _one_line(note)
            lines.append(
                f"| {case['quantity']} | {','.join(map(str, case['widths']))} | {case['batch']} | {name} | "
                + (f"{e['median_s'] * 1e3:.3f} | {e['x_hessext']:.2f} | {e['x_gradient']:.2f}" if timed else "n/a | | ")
                + f" | {note} |"
            )
    return (
        "\n".join(lines + [""] + [f"- {_one_line(n, 240)}" for n in report["notes"] if "for this quantity" not in n])
        + "\n"
    )


def plot(report, path):
    """Time against width (at the largest batch) and against batch size (for the widest
    architecture), log scale, one line per method, one colour per method throughout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantities = sorted({c["quantity"] for c in report["cases"]}, key=QUANTITIES.index)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(len(quantities), 2, figsize=(11, 3.6 * len(quantities)), squeeze=False)
    for row, q in enumerate(quantities):
        cases = [c for c in report["cases"] if c["quantity"] == q]
        widest = max(cases, key=lambda c: c["P"])["widths"]
        largest = max(c["batch"] for c in cases)
        panels = (
            (lambda c: max(c["widths"]), f"largest width (N = {largest})", lambda c: c["batch"] == largest),
            (lambda c: c["batch"], f"batch size ({','.join(map(str, widest))})", lambda c: c["widths"] == widest),
        )
        for col, (xkey, xlabel, keep) in enumerate(panels):
            ax = axes[row][col]
            chosen = [c for c in cases if keep(c)]
            for m in METHODS + tuple(sorted({m for c in chosen for m in c["methods"]} - set(METHODS))):
                pts = sorted(
                    (xkey(c), c["methods"][m]["median_s"]) for c in chosen if "median_s" in c["methods"].get(m, {})
                )
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=m, color=colors.get(m))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("median time (ms)")
            ax.set_title(f"{q} ({report['dtype']}, {report['environment']['device']})", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ints(text):
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(prog="hessext-bench", description=__doc__, formatter_class=Formatter)
    parser.add_argument("--quantities", default="hvp,diagonal", help=f"comma-separated from {','.join(QUANTITIES)}")
    parser.add_argument(
        "--widths", action="append", type=_ints, help="an architecture, e.g. 784,256,256,10 (repeatable)"
    )
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="a named architecture (repeatable)")
    parser.add_argument("--batch", type=_ints, default=[100], help="comma-separated batch sizes")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {','.join(METHODS)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--k", type=_positive, default=16, help="vectors for hvp-batched")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per method")
    parser.add_argument("--threads", type=_positive, default=None)
    parser.add_argument("--out", default=None, help="JSON report path (none written unless given)")
    parser.add_argument("--plot", default=None, help="PNG path (needs matplotlib)")
    parser.add_argument("--md", default=None, help="markdown table path")
    args = parser.parse_args(argv)
    quantities = [q for q in args.quantities.split(",") if q]
    methods = [m for m in args.methods.split(",") if m]
    for q in quantities:
        if q not in QUANTITIES:
            parser.error(f"--quantities: {q!r} is not one of {QUANTITIES}")
    for m in methods:
        if m not in METHODS:
            parser.error(f"--methods: {m!r} is not one of {METHODS}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: {args.device!r} is not a device (cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: {args.device!r} is not cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if not args.min_run_time > 0:
        parser.error(f"--min-run-time must be positive, got {args.min_run_time}")
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = (args.widths or []) + [PRESETS[p] for p in (args.preset or [])] or [PRESETS["tiny"]]
    for widths in archs:
        if len(widths) < 2:
            parser.error(
                f"--widths {','.join(map(str, widths))}: an architecture needs an input and an output "
                "width (at least one Linear layer, so that there are parameters)"
            )
    report = run(
        quantities, archs, args.batch, methods, args.device, getattr(torch, args.dtype), args.k, args.min_run_time
    )
    print(format_table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(report))
        print(f"wrote {args.md}")
    if args.plot:
        try:
            plot(report, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install matplotlib)")


if __name__ == "__main__":
    main()
