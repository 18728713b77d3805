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
    """Absolute paths of the sources: the schemas, the CPU kernels and, with cuda, the CUDA kernels."""
    files = [os.path.join(CSRC, "hessext.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if cuda:
        files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    return files


# The C++ standard is the one torch.utils.cpp_extension picks for this torch. -fopenmp makes
# at::parallel_for (a header template) run on torch's OpenMP threads; without it every loop is serial.
# Linking it binds libgomp.so.1, which resolves to the copy torch itself has loaded (one runtime).
CXX_FLAGS = ["-O3", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3"]
