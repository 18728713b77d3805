"""Timing and memory of one method: median and interquartile range (torch.utils.benchmark.Timer, CUDA
synchronised), the peak memory of one call, and the environment a report records."""

import datetime
import os
import platform
import subprocess

import torch
import torch.nn as nn
from torch.utils.benchmark import Timer

import hessext
from hessext import _native


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
