"""`python -m hessext.info`: what was built (CPU/CUDA, torch and CUDA versions) and whether the
native path is usable, and why not."""

import platform

import torch

from hessext import _native


def report():
    lines = [
        f"hessext on Python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda or 'none'}, GPU available: {torch.cuda.is_available()})"
    ]
    status = _native.status()
    if status["loaded"]:
        cuda = f"CUDA {status['cuda_version']}" if status["with_cuda"] else "CPU only"
        lines.append(
            f"native kernels: usable, {status['source']}, built against torch {status['torch_version']}, {cuda}"
        )
        if status["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:
            lines.append(
                f"  warning: built against torch {status['torch_version']}, running {torch.__version__}; "
                + _native.REBUILD
            )
        blas = status["blas"]
        lines.append(f"CPU matrix products: {blas['name']}" + (f" (ATen's: {blas['why']})" if blas["why"] else ""))
        for slot, chosen in blas["choice"].items():
            rates = blas["rates"].get(slot)
            measured = ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()) if rates else "not measured"
            lines.append(f"  {slot}: {chosen} (GFLOP/s: {measured})")
        if blas["measured"]:
            lines.append(f"  measured {blas['measured']}; python -m hessext.info --measure measures again")
        if _native.load().row_pieces_on():
            lines.append("  products over 10^6 multiply-adds cut into row pieces for its small-matrix path")
        lines.append(f"CPU sample-lane kernels (one vector, narrow stacks): {_native.load().simd()} instructions")
        kept = _native.load().workspace_bytes() / 2**20
        lines.append(f"CPU scratch kept between calls by this thread: {kept:.1f} MB (at most 256 MB a thread)")
        names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("hessext::"))
        lines.append(f"ops: {', '.join(names)}")
    else:
        lines.append(f"native kernels: unavailable, every call uses torch.func ({status['error']})")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if "--measure" in sys.argv[1:]:
        from hessext import _blas

        _blas.use(_native.load(), measure=True)
    print(report())
