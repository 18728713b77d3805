"""Memory estimates: the bytes a call will hold at its peak, computed before anything is allocated,
so that a request beyond the memory available (or the caller's `max_bytes`) is refused up front with
the figure. The estimates follow the kernels' own workspace plans (csrc/hessian.h, csrc/jets.h) and the
torch.func fallback's chunking (fallback.CHUNK_BYTES)."""

import torch

from hessext import fallback, ops
from hessext.inputs import remember

HESSIAN_CHUNK_ELEMS = 2**24  # csrc/hessian.h kHessianChunkElems
FUSED_HESSIAN_WORK = 2**20  # csrc/stack.h PathChoice::fused_hessian: M P^2 at most this
# small temporaries and 2 MB pages; plus 10% for freed heap memory the allocator keeps
SLACK = 32 * 2**20


def available_bytes(device):
    """Memory a new tensor can take on `device`: free GPU memory, or MemAvailable on the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 2**62


def check_max_bytes(max_bytes):
    if max_bytes is None:
        return
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
        raise TypeError(f"max_bytes must be an int number of bytes (e.g. 2 * 2**30) or None, got {max_bytes!r}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")


def check(what, nbytes, ref, max_bytes, hint):
    if max_bytes is None and nbytes < 2**28:  # small requests fit anywhere; skip reading the free memory
        return
    limit = available_bytes(ref.device) if max_bytes is None else max_bytes
    if nbytes > limit:
        raise ValueError(
            f"{what} would need {nbytes:,} bytes, more than the {limit:,} bytes available on {ref.device}; {hint}"
        )


def hessian_peak(call, inputs, blocks):
    """Bytes the native hessian op holds at its peak (csrc/hessian.h): the block accumulators (float64
    for float32; a diagonal block's lower unit pairs only) while the samples are summed, with one
    chunk's G_l (and its lower pairs), A_{l,k} and per-sample factors and one block-sized product; then
    the result with the accumulators. The fused per-sample path instead
    holds one [P, P] per thread and their sum. Plus the forward/backward activations."""
    plan, tensors = call.plan, call.tensors
    es = tensors[0].element_size()
    acc_es = 8 if tensors[0].dtype == torch.float32 else es
    shapes = [tuple(tensors[j].shape) for j in plan.weight_pos]  # (o, n) per layer
    biased = [j is not None for j in plan.bias_pos]
    L = len(shapes)
    wanted = [(l, k) for l in range(L) for k in range(l + 1) if blocks == "full" or l == k]

    def factor_elems(l, k):  # csrc/hessian.h pair_factor_elems
        (o, n), (p, nk) = shapes[l], shapes[k]
        return o * p + (n + 1) * (nk + 1) + (n * p * min(o, nk + 1) if k < l else 0)

    widest = max(factor_elems(l, k) for l, k in wanted)
    x = plan.stack.pre(inputs)
    M = x.numel() // shapes[0][1]
    mc = max(1, min(M, HESSIAN_CHUNK_ELEMS // widest, 256 if acc_es != es else M))
    # a diagonal block holds the rows of its lower unit pairs o >= p only
    rows = [
        (shapes[l][0] * (shapes[l][0] + 1) // 2 if l == k else shapes[l][0] * shapes[k][0])
        * (shapes[l][1] + 1)
        * (shapes[k][1] + 1)
        for l, k in wanted
    ]
    acc = sum(rows) * acc_es
    maxw = max(max(o, n) for o, n in shapes)
    # G_l, A, GW, G_l A and kron per chunk, G_l's lower pairs, the per-sample factors, one block product
    chunk = (((L + 3) * maxw + (maxw + 1) // 2) * mc * maxw + mc * widest) * es + max(rows) * (
        es + (acc_es if acc_es != es else 0)
    )
    sizes = [o * n + (o if b else 0) for (o, n), b in zip(shapes, biased)]
    result = (sum(sizes) ** 2 if blocks == "full" else sum(n * n for n in sizes)) * es
    P = sum(sizes)
    small = blocks == "full" and maxw <= 64 and M * P * P <= FUSED_HESSIAN_WORK  # PathChoice::fused_hessian
    fused = (torch.get_num_threads() + 1) * P * P * es if small else 0
    activations = 4 * M * (shapes[0][1] + sum(o for o, _ in shapes)) * es
    scatter = max(rows) * 8 if acc_es != es else 0  # a float64 block cast for H's float32 entries
    peak = max(acc + chunk, acc + result + scatter + 256 * 256 * es * 2, fused) + activations
    return int(peak * 1.1) + SLACK


def basis_peak(result, ref, P, per_vector):
    """Bytes the torch.func basis products hold: the result, its rows before they are joined, and
    per chunk the basis vectors, their products and the vmapped graphs behind them (a chunk holds
    about fallback.CHUNK_BYTES of vectors and graphs, or one vector's; measured on MLPs: about five
    chunks' bytes with tanh, 7.8 with softsign)."""
    one = P * ref.element_size() + per_vector
    chunk = min(max(fallback.CHUNK_BYTES, one), P * one)
    return int((2 * result + 9 * chunk) * 1.1) + SLACK


def graph_jet_bytes(call, N, k, mode, es):
    """Bytes the differentiable jets hold: every layer's channels, twice for a hidden layer (before and
    after its activation, kept for the reverse pass), and the reverse pass's gradients of them."""
    outs = sum(call.tensors[j].shape[0] for j in call.plan.weight_pos)
    return int(N * (1 + k + ops.jet_channels(mode, k)) * outs * es * 4 * 1.1) + SLACK


def jet_peak(call, M, mode):
    """Bytes the native input_derivatives op holds (csrc/hessian.h input_derivatives_plan): the jets'
    per-layer channels [1 + d + q, M, o_l] (q: 1 for the Laplacian, d for the diagonal, d(d+1)/2 for
    the full Hessian) and their products at the output, or the backward recurrence's chunks of at most
    2^24 entries per thread; the result, twice where the threads' row blocks are joined. Measured
    peaks ([784,256,256,10], [50,128,128,1], [20,64,3], [2,50,50,50,1], 200-4096 samples): 0.3-1.0 of it."""
    plan, tensors = call.plan, call.tensors
    es = tensors[0].element_size()
    key = (M, mode, es, torch.get_num_threads())
    known = plan.peaks.get(key)
    if known is not None:  # the same shapes: the same estimate (it costs more than a small call's kernel)
        return known
    outs = [tensors[j].shape[0] for j in plan.weight_pos]
    widths = [tensors[plan.weight_pos[0]].shape[1]] + outs
    d, C = widths[0], outs[-1]
    q = {0: 1, 1: d, 2: d * (d + 1) // 2}[mode]
    jets = sum(n * o for n, o in zip(widths[:-1], outs)) * (1 + d + q)
    back = widths[1] ** 2 * d + sum(2 * n * o * o for n, o in zip(widths[1:-1], outs[1:]))
    result = M * {0: C, 1: d, 2: d * d}[mode] * es
    if mode == 0 or jets <= back:
        work = M * (1 + d + q) * (sum(outs) + 2 * C) * es
    else:
        widest = max(w * w for w in widths)
        work = 3 * min(M * widest, torch.get_num_threads() * HESSIAN_CHUNK_ELEMS) * es
    peak = int((work + 2 * result) * 1.1) + SLACK
    remember(plan.peaks, key, peak, 64)
    return peak


def basis_input_peak(result, per_vector, N, d, like):
    """Bytes the torch.func input derivatives hold: the result and its pieces, and per chunk of
    directions their basis, products and graphs (as `basis_peak`)."""
    one = per_vector + 2 * N * d * like.element_size()
    chunk = min(max(fallback.CHUNK_BYTES, one), N * d * one)
    return int((2 * result + 9 * chunk) * 1.1) + SLACK
