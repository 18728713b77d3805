"""Where a small CUDA HVP's time goes, per net: the whole call, the op alone (and the CPU time to
launch it), the call without the finiteness read-back, a CUDA-graph replay of the op (GPU time plus one
launch) and replays back to back (GPU time), the kernels per call, and torch.profiler's top ops.
Medians of 300 calls, each synchronised.

    python benchmarks/gpu_profile.py [--out DIR]   ->   DIR/gpu_profile.txt"""

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

import hessext
from hessext import _native, _route, bench, ops

NETS = [([1, 16, 1], 100), ([2, 50, 50, 50, 1], 4096)]


def median_us(f, n=300):
    for _ in range(30):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        f()
        torch.cuda.synchronize()
        times.append(time.perf_counter_ns() - t)
    times.sort()
    return times[n // 2] / 1e3


def op_args(call):
    """The arguments hessext.hvp passes to the native op."""
    seen, real = {}, ops.call

    def spy(name, *args):
        seen[name] = args
        return real(name, *args)

    ops.call = spy
    try:
        call()
    finally:
        ops.call = real
    return seen["hvp"]


def graph_of(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def profile_net(widths, N):
    pb = bench.make_problem(widths, N, "cuda", torch.float32, 16)
    call = lambda: hessext.hvp(pb.model, bench.mse, pb.x, pb.y, pb.v)  # noqa: E731
    C, args = _native.load(), op_args(call)
    op = lambda: C.hvp(*args)  # noqa: E731
    whole, alone = median_us(call), median_us(op)
    finite, _route.finite = _route.finite, lambda *t: True
    try:
        unchecked = median_us(call)
    finally:
        _route.finite = finite
    torch.cuda.synchronize()
    start = time.perf_counter_ns()
    for _ in range(200):
        op()
    launch = (time.perf_counter_ns() - start) / 200e3
    graph = graph_of(op)
    replay = median_us(graph.replay)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(200):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    gpu = begin.elapsed_time(end) / 200 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            call()
        torch.cuda.synchronize()
    kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA) / 10
    line = (
        f"{widths} N={N}: call {whole:.1f} us, op {alone:.1f} (launch-only {launch:.1f}), call without finite "
        f"read-back {unchecked:.1f}, graph replay {replay:.1f} (back-to-back GPU {gpu:.1f}), kernels per call "
        f"{kernels:.0f}"
    )
    tables = prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60
    ) + prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60)
    return line, tables


def profile_quantities(widths, N):
    """The whole call and kernels per call of the other quantities on one net."""
    pb = bench.make_problem(widths, N, "cuda", torch.float32, 16)
    calls = {
        "diagonal": lambda: hessext.hessian_diag(pb.model, bench.mse, pb.x, pb.y),
        "hessian": lambda: hessext.hessian(pb.model, bench.mse, pb.x, pb.y, output="matrix"),
        "laplacian": lambda: torch.no_grad()(hessext.laplacian)(pb.model, pb.x),
    }
    lines, tables = [], []
    for name, call in calls.items():
        whole = median_us(call, 100)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        kernels = sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA) / 10
        lines.append(f"{widths} N={N} {name}: call {whole:.1f} us, kernels per call {kernels:.0f}")
        tables.append(
            f"{name}\n" + averages.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=60)
        )
    return lines, tables


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    lines, tables = [], []
    for widths, N in NETS:
        line, table = profile_net(widths, N)
        print(line, flush=True)
        lines.append(line)
        tables.append(table)
    more, more_tables = profile_quantities(*NETS[0])
    print("\n".join(more), flush=True)
    lines += more
    tables += more_tables
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_profile.txt"), "w") as f:
        f.write("\n".join(lines) + "\n\n" + "\n".join(tables))


if __name__ == "__main__":
    main()
