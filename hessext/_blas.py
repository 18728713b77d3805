"""Which BLAS the CPU kernels' matrix products use (csrc/gemm.h).

By default an OpenBLAS: the `scipy-openblas64` wheel's (a dependency; a copy of the library of its
own, so its kernels can be chosen), else the copy that numpy >= 2 ships (`numpy.libs`), else none.
Its kernels follow torch's CPU capability, as torch's own kernels do (ATEN_CPU_CAPABILITY lowers
it): SkylakeX with AVX-512, Haswell with AVX2, else OpenBLAS's own pick; HESSEXT_OPENBLAS_CORETYPE
overrides. OPENBLAS_CORETYPE, which numpy's copy follows, does not decide hessext's: on this
project's CPU machines it says Haswell, while the SkylakeX kernels run the MLP products 1.2-2x
faster (benchmarks/results/blas_cpu.md: 164 against 103 GFLOP/s for [256,784]x[784,256], against
85 for ATen's MKL). HESSEXT_BLAS=aten keeps ATen's products; HESSEXT_BLAS=<path> names a library.
When none loads, the products are ATen's and `python -m hessext.info` says why; nothing fails."""

import glob
import importlib.util
import os

_state = {"name": "ATen", "why": "not loaded yet", "path": None}


def _wheel():
    try:
        import scipy_openblas64
    except ImportError:
        return []
    return [os.path.join(scipy_openblas64.get_lib_dir(), f"lib{scipy_openblas64.get_library()}.so")]


def _numpy_copy():
    spec = importlib.util.find_spec("numpy")
    if spec is None or not spec.origin:
        return []
    site = os.path.dirname(os.path.dirname(spec.origin))
    return sorted(glob.glob(os.path.join(site, "numpy.libs", "libscipy_openblas64_*.so")))


def candidates(choice=None):
    """Library paths to try, in order, for choice "openblas", "aten" (none) or a path; None reads
    HESSEXT_BLAS (default "openblas")."""
    choice = choice or os.environ.get("HESSEXT_BLAS", "openblas")
    if choice == "aten":
        return []
    return [choice] if choice != "openblas" else _wheel() + _numpy_copy()


def _core_type():
    """The OpenBLAS kernels to ask for (module docstring), or None for OpenBLAS's own pick."""
    import torch

    if os.environ.get("HESSEXT_OPENBLAS_CORETYPE"):
        return os.environ["HESSEXT_OPENBLAS_CORETYPE"]
    return {"AVX512": "SkylakeX", "AVX2": "Haswell"}.get(torch.backends.cpu.get_cpu_capability())


def use(module, choice=None):
    """Load the BLAS for `module` (hessext._C): choice "openblas" (the default search), "aten", or a
    library path; None reads HESSEXT_BLAS. Returns what the products now run on."""
    choice = choice or os.environ.get("HESSEXT_BLAS", "openblas")
    reasons, core, before = [], _core_type(), os.environ.get("OPENBLAS_CORETYPE")
    if core:  # read by the library's constructor at its first load (importing the wheel loads it)
        os.environ["OPENBLAS_CORETYPE"] = core
    try:
        for path in candidates(choice):
            why = module.blas_load(path)
            if not why:
                _state.update(name=module.blas_name(), why=None, path=path)
                return _state["name"]
            reasons.append(why)
    finally:
        if core and before is None:
            os.environ.pop("OPENBLAS_CORETYPE")
        elif core:
            os.environ["OPENBLAS_CORETYPE"] = before
    module.blas_load("")
    if not reasons:
        reasons.append("HESSEXT_BLAS=aten" if choice == "aten" else "no OpenBLAS found (pip install scipy-openblas64)")
    _state.update(name="ATen", why="; ".join(reasons), path=None)
    return _state["name"]


def status():
    """dict: name (what the CPU products run on), why (None, or why not OpenBLAS), path."""
    return dict(_state)
