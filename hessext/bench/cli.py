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
import json
import sys
import time
import warnings

import torch

from hessext.bench.methods import METHODS, External, builders
from hessext.bench.problems import PRESETS, QUANTITIES, Skip, check, make_problem, mse, reference
from hessext.bench.report import format_table, markdown, plot
from hessext.bench.timing import environment, measure


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
