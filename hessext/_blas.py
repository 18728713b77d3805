"""Which BLAS serves the CPU kernels' matrix products (csrc/gemm.h), chosen on this machine from
measured rates.

The libraries tried, each found on disk without importing it:
- OpenBLAS: the `scipy-openblas64` wheel's own copy (a dependency), else numpy's (`numpy.libs`). Its
  kernels follow torch's CPU capability, as torch's own kernels do (ATEN_CPU_CAPABILITY lowers it):
  SkylakeX with AVX-512, Haswell with AVX2; HESSEXT_OPENBLAS_CORETYPE overrides. OPENBLAS_CORETYPE,
  which numpy's copy follows, does not decide hessext's.
- MKL: the `mkl` wheel's libmkl_rt (`pip install "hessext[blas]"`), sequential in each calling thread,
  held to AVX2 (MKL_ENABLE_INSTRUCTIONS) where torch is.
- BLIS: the build inside the `blis` wheel, with its Haswell, Zen and other kernels chosen by BLIS.
- ATen's own products (torch's MKL), always.

HESSEXT_BLAS=auto (the default) times every loaded library and ATen on the matrix products of MLPs
(the narrow class: a middle dimension of at most 128, as in nets of width 50-64 and their weight
products over a batch; the wide class: widths of 256-784), in float64 and float32 at torch's thread
count, and lets the fastest serve each dtype and class. The choice is measured once per machine and
kept in a cache file (HESSEXT_CACHE, default ~/.cache/hessext) keyed by the CPU, torch's capability,
the thread count and the libraries; `python -m hessext.info` names it with its rates, and
`python -m hessext.info --measure` measures again. HESSEXT_BLAS=openblas, mkl, blis, aten or a
library path holds every product to one. When none loads, the products are ATen's and the status
says why; nothing fails."""

import glob
import importlib.util
import json
import os
import platform
import sys
import time

LIBRARIES = ("openblas", "mkl", "blis")
CLASSES = ("narrow", "wide")
DTYPES = ("float64", "float32")
# The products the choice is measured on, [m, k, n] per class: an MLP's forward, backward and weight
# products at the widths of each class.
SHAPES = {
    "narrow": [(1024, 50, 50), (50, 1024, 50), (1024, 50, 1), (256, 64, 64), (64, 256, 64)],
    "wide": [(256, 784, 256), (256, 256, 784), (256, 256, 256), (256, 256, 10), (256, 10, 256)],
}
ROUNDS = 5  # each library timed once per round, in turn, keeping its best: the machine may be shared
_state = {"name": "ATen", "why": "not loaded yet", "libraries": [], "choice": {}, "rates": {}, "measured": None}


def _site(package):
    """The directory holding an installed package (without importing it), or None."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None
    return list(spec.submodule_search_locations or [os.path.dirname(spec.origin)])[0]


def _openblas():
    paths = []
    here = _site("scipy_openblas64")
    if here:
        paths += sorted(glob.glob(os.path.join(here, "lib", "libscipy_openblas64_*.so")))
    numpy = _site("numpy")
    if numpy:
        paths += sorted(glob.glob(os.path.join(os.path.dirname(numpy), "numpy.libs", "libscipy_openblas64_*.so")))
    return paths


def _mkl():
    roots = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable))}
    return sorted({p for r in roots for p in glob.glob(os.path.join(r, "lib", "libmkl_rt.so*"))})[:1]


def _blis():
    here = _site("blis")
    return sorted(glob.glob(os.path.join(here, "cy*.so"))) if here else []


def candidates(choice="openblas"):
    """Library paths to try, in order, for a library name ("openblas", "mkl", "blis"), "aten" (none) or a
    path."""
    finders = {"openblas": _openblas, "mkl": _mkl, "blis": _blis}
    if choice == "aten":
        return []
    return finders[choice]() if choice in finders else [choice]


def _core_type():
    """The OpenBLAS kernels to ask for (module docstring), or None for OpenBLAS's own pick."""
    import torch

    if os.environ.get("HESSEXT_OPENBLAS_CORETYPE"):
        return os.environ["HESSEXT_OPENBLAS_CORETYPE"]
    return {"AVX512": "SkylakeX", "AVX2": "Haswell"}.get(torch.backends.cpu.get_cpu_capability())


def _load(module, name):
    """Load the first library of a family (or a path) that loads: (index, why not)."""
    import torch

    core, before = _core_type(), os.environ.get("OPENBLAS_CORETYPE")
    if name == "openblas" and core:  # read by the library's constructor at its first load
        os.environ["OPENBLAS_CORETYPE"] = core
    if name == "mkl" and torch.backends.cpu.get_cpu_capability() == "AVX2":
        os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")  # torch's own MKL reads it too
    reasons = []
    try:
        for path in candidates(name):
            index, why = module.blas_load(path)
            if index >= 0:
                return index, None
            reasons.append(why)
    finally:
        if name == "openblas" and core:
            os.environ.pop("OPENBLAS_CORETYPE") if before is None else os.environ.update(OPENBLAS_CORETYPE=before)
    return -1, "; ".join(reasons) or f"no {name} found"


def _cpu():
    """The CPU's model name and torch's capability (the cache key's machine part)."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} / {torch.backends.cpu.get_cpu_capability()}"


def _cache_path():
    root = os.environ.get("HESSEXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hessext")
    return os.path.join(root, "blas.json")


def _measure(module, libraries):
    """{"float64 narrow": {library name or "ATen": GFLOP/s}, ...}: each loaded library ({index in the
    module: name}) and ATen timed on SHAPES through the kernels' own product (csrc/gemm.cpp)."""
    import torch

    rates = {}
    for dtype in DTYPES:
        for cls_index, cls in enumerate(CLASSES):
            operands = [
                (torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(k, n, dtype=getattr(torch, dtype)))
                for m, k, n in SHAPES[cls]
            ]
            outputs = [torch.empty(a.shape[0], b.shape[1], dtype=a.dtype) for a, b in operands]
            flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in operands)
            best = {}
            for _ in range(ROUNDS):
                for index in [-1] + list(libraries):
                    module.blas_choose(dtype == "float64", cls_index, index)
                    for (a, b), c in zip(operands, outputs):  # warm: the library's buffers, the caches
                        module.mm_into(c, a, b)
                    reps, start = 0, time.perf_counter()
                    while reps < 3 or time.perf_counter() - start < 0.01:
                        for (a, b), c in zip(operands, outputs):
                            module.mm_into(c, a, b)
                        reps += 1
                    seconds = (time.perf_counter() - start) / reps
                    best[index] = min(best.get(index, seconds), seconds)
            rates[f"{dtype} {cls}"] = {libraries.get(i, "ATen"): flops / s / 1e9 for i, s in best.items()}
    return rates


def _choose(module, libraries, measure=False):
    """Measure (or read from the cache) and apply the fastest library per dtype and class; libraries:
    {index in the module: name}."""
    import torch

    key = json.dumps([_cpu(), torch.get_num_threads(), list(libraries.values()), sorted(SHAPES.items())])
    path, cache = _cache_path(), {}
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        pass
    if measure or key not in cache:
        cache[key] = {"rates": _measure(module, libraries), "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # a read-only home: measured again in the next process
    entry = cache[key]
    choice, index = {}, {name: i for i, name in libraries.items()}
    for slot, rates in entry["rates"].items():
        dtype, cls = slot.split()
        choice[slot] = max(rates, key=rates.get)
        module.blas_choose(dtype == "float64", CLASSES.index(cls), index.get(choice[slot], -1))
    return choice, entry["rates"], entry["measured"]


def _serve_all(module, index):
    """One library (its index in the module; -1: ATen) for every dtype and class."""
    for dtype in DTYPES:
        for cls_index in range(len(CLASSES)):
            module.blas_choose(dtype == "float64", cls_index, index)


def use(module, choice=None, measure=False):
    """Load the BLAS libraries for `module` (hessext._C) and choose which serves each dtype and class:
    choice "auto" (measured), "openblas", "mkl", "blis", "aten" or a library path; None reads
    HESSEXT_BLAS (default "auto"). measure: time again even if the cache has this machine. Returns
    what the products now run on (status()["name"])."""
    choice = choice or os.environ.get("HESSEXT_BLAS", "auto")
    _serve_all(module, -1)
    _state.update(name="ATen", why=None, libraries=[], choice={}, rates={}, measured=None)
    if choice == "aten":
        _state["why"] = "HESSEXT_BLAS=aten"
        return _state["name"]
    loaded, reasons = [], []
    for name in LIBRARIES if choice == "auto" else [choice]:
        index, why = _load(module, name)
        if index >= 0:
            loaded.append(index)
        elif choice != "auto" or name == "openblas":  # mkl and blis are optional
            reasons.append(why)
    everything = module.blas_names()
    libraries = {i: everything[i] for i in loaded}
    names = list(libraries.values())
    if not names:
        _state["why"] = "; ".join(reasons) + " (pip install scipy-openblas64)"
        return _state["name"]
    if len(names) == 1 and choice != "auto":
        chosen = {f"{d} {c}": names[0] for d in DTYPES for c in CLASSES}
        _serve_all(module, loaded[0])
        rates, measured = {}, None
    else:
        chosen, rates, measured = _choose(module, libraries, measure)
    distinct = sorted(set(chosen.values()), key=list(chosen.values()).index)
    summary = distinct[0] if len(distinct) == 1 else "; ".join(f"{slot}: {lib}" for slot, lib in chosen.items())
    _state.update(name=summary, libraries=names, choice=chosen, rates=rates, measured=measured)
    return _state["name"]


def status():
    """dict: name (what the CPU products run on: one library, or the choice per dtype and class), why
    (None, or why ATen serves every product), libraries (the names of those loaded), choice
    ({"float64 narrow": name, ...}), rates (the measured GFLOP/s behind it), measured (when)."""
    return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in _state.items()}
