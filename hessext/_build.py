"""What hessext._C is built from: shared by setup.py (ahead of time) and _native.py (JIT build).

Imports nothing from hessext, so that setup.py can load it before the package is built."""

import glob
import os

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def want_cuda():
    """CUDA sources are compiled when HESSEXT_FORCE_CUDA=1, or when torch has CUDA and sees a GPU."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("HESSEXT_FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def sources(cuda):
    """Absolute paths of the sources: the schemas and module, the test entries, the CPU kernels and,
    with cuda, the CUDA kernels."""
    files = [os.path.join(CSRC, f) for f in ("hessext.cpp", "testing.cpp")]
    files += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if cuda:
        files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    return files


# The C++ standard is the one torch.utils.cpp_extension picks for this torch. -fopenmp makes
# at::parallel_for (a header template) run on torch's OpenMP threads; without it every loop is serial.
# Linking it binds libgomp.so.1, which resolves to the copy torch itself has loaded (one runtime).
# -fno-trapping-math lets GCC turn a floating-point comparison in a loop (the clamp of exp_cpu.h, say)
# into a vector blend on AVX2 and SSE2, which have no masked compares: with the default
# -ftrapping-math those loops stayed scalar there (vectorised only under AVX-512). It changes no value
# (no reassociation, no contraction beyond the default); the kernels never read floating-point traps.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3"]


def check_shared_libstdcxx(path):
    """Refuse a built extension that does not link libstdc++.so: its compiler linked a static copy,
    whose C++ streams are never initialised inside a Python extension. Seen on a GPU machine whose
    CXX was such a g++ wrapper: a segmentation fault formatting any error message with a number in it
    (every shape check). Skipped where `ldd` is missing."""
    import shutil
    import subprocess

    if not shutil.which("ldd"):
        return
    needed = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=60).stdout
    if needed and "libstdc++" not in needed:
        raise RuntimeError(
            f"{path} does not link libstdc++.so: the C++ compiler ({os.environ.get('CXX', 'c++')}) "
            "linked a static copy, which crashes formatting error messages inside Python. Build "
            "with a compiler that links it as torch does, e.g. CC=/usr/bin/gcc CXX=/usr/bin/g++"
        )
