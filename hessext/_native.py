"""Load the native module: the ahead-of-time build hessext._C, else a JIT build of csrc/ with ninja,
else None with one warning (every call then takes the torch.func fallback).

Loading is lazy (first native call) and happens once; `status()` says what happened."""

import os
import threading
import warnings

from hessext import _blas, _build

_lock = threading.Lock()
_state = {"tried": False, "module": None, "source": None, "error": None}


def _jit_build():
    from torch.utils.cpp_extension import load

    cuda = _build.want_cuda()
    if not os.path.isdir(_build.CSRC):
        raise ImportError(f"the sources are not installed beside the package (looked in {_build.CSRC})")
    warnings.warn("hessext: hessext._C is not built; compiling csrc/ now (one time, about a minute)")
    module = load(
        name="hessext_jit",
        sources=_build.sources(cuda),
        extra_include_paths=[_build.CSRC],
        extra_cflags=_build.CXX_FLAGS + (["-DWITH_CUDA"] if cuda else []),
        extra_cuda_cflags=_build.NVCC_FLAGS + ["-DWITH_CUDA"],
        extra_ldflags=_build.LINK_FLAGS,
    )
    _build.check_shared_libstdcxx(module.__file__)
    return module


REBUILD = "rebuild it against the running torch: pip install --no-build-isolation --force-reinstall <hessext source>"


def _torch_version():
    import torch

    return torch.__version__


def check_torch_version(built):
    """A build for another torch: a different major.minor (whose C++ ABI differs: refused, ImportError)
    or another patch release (a warning). As xformers and torch_scatter do."""
    import torch

    running = torch.__version__.split("+")[0]
    built_base = built.split("+")[0]
    if running.split(".")[:2] != built_base.split(".")[:2]:
        raise ImportError(
            f"hessext._C was built against torch {built}, but torch {torch.__version__} is running; " + REBUILD
        )
    if running != built_base:
        warnings.warn(
            f"hessext: hessext._C was built against torch {built}, torch {torch.__version__} is running "
            f"(same minor release, so it loads); if anything misbehaves, {REBUILD}",
            stacklevel=3,
        )


def load():
    """The native module, or None when neither the prebuilt module nor a JIT build is usable."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        errors = []
        try:
            from hessext import _C

            check_torch_version(_C.torch_version())
            _state.update(module=_C, source="prebuilt (hessext._C)")
        except ImportError as exc:
            hint = (
                f" (a build for another torch than the running {_torch_version()}? {REBUILD})"
                if "undefined symbol" in str(exc)
                else ""
            )
            errors.append(f"hessext._C: {exc}{hint}")
            if os.environ.get("HESSEXT_NO_JIT", "0") != "1":
                try:
                    _state.update(module=_jit_build(), source="JIT build of csrc/")
                except Exception as jit_exc:  # a failed compiler run must not break the fallback
                    errors.append(f"JIT build: {jit_exc}")
            else:
                errors.append("JIT build disabled by HESSEXT_NO_JIT=1")
        if _state["module"] is not None:
            _follow_capability(_state["module"])
            _blas.use(_state["module"])
        else:
            _state["error"] = "; ".join(errors)
            warnings.warn(f"hessext: native kernels unavailable, using torch.func ({_state['error']})")
        _state["tried"] = True
        return _state["module"]


def _follow_capability(module):
    """hessext's vector loops take no wider instructions than torch's own kernels: ATEN_CPU_CAPABILITY=avx2
    holds torch, hessext and (through _blas) its OpenBLAS to AVX2 on an AVX-512 CPU."""
    import torch

    order = ["baseline", "avx2", "avx512"]
    torch_isa = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "baseline")
    if order.index(torch_isa) < order.index(module.simd()):
        module.simd(torch_isa)


def loaded():
    """The native module if loading it was tried and succeeded, else None (never starts a build)."""
    return _state["module"]


def status():
    """dict: loaded (bool), source, error, with_cuda, cuda_version, torch_version (of the build)."""
    module = load()
    info = {"loaded": module is not None, "source": _state["source"], "error": _state["error"]}
    if module is not None:
        info.update(
            with_cuda=module.with_cuda(),
            cuda_version=module.cuda_version(),
            torch_version=module.torch_version(),
            blas=_blas.status(),
        )
    return info
