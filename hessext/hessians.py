"""Full Hessians: with respect to the weights (dense or block-diagonal, dict or matrix) and to the
inputs (per-sample input Hessians of the loss, Laplacians of the model output).

Each call: plan (cached capture) -> argument checks (and a memory estimate before allocating) ->
one native op or the torch.func fallback -> results shaped like the user's parameters/inputs."""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from hessext import compiled, fallback, jets, ops
from hessext._types import LossFn, Params, Tensor
from hessext.compiled import unwrap
from hessext.curvature import _native_raw, _stack_args, route, run_native
from hessext.inputs import check_samples, native_batch, native_inputs, remember, rows_are_samples, transformed

OUTPUTS = ("dict", "matrix")
BLOCKS = ("full", "layer")
_MODEL_ONLY = nn.MSELoss()  # the loss a model-only quantity (the Laplacian) is planned with
_HESSIAN_CHUNK_ELEMS = 2**24  # csrc/hessian.h kHessianChunkElems
_FUSED_HESSIAN_WORK = 2**20  # csrc/stack.h PathChoice::fused_hessian: M P^2 at most this
# small temporaries and 2 MB pages; plus 10% for freed heap memory the allocator keeps
_SLACK = 32 * 2**20


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


def _check_memory(what, nbytes, ref, max_bytes, hint):
    if max_bytes is None and nbytes < 2**28:  # small requests fit anywhere; skip reading the free memory
        return
    limit = available_bytes(ref.device) if max_bytes is None else max_bytes
    if nbytes > limit:
        raise ValueError(
            f"{what} would need {nbytes:,} bytes, more than the {limit:,} bytes available on {ref.device}; {hint}"
        )


def _layers(plan):
    """Groups of parameter positions (named order), one per layer: the Linear layers of a native stack,
    else the parameters of each module."""
    if plan.stack is not None:
        return [[j for j in (w, b) if j is not None] for w, b in zip(plan.weight_pos, plan.bias_pos)]
    groups = {}
    for j, name in enumerate(plan.param_names):
        groups.setdefault(name.rpartition(".")[0], []).append(j)
    return list(groups.values())


def hessian(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Params = None,
    backend: str = "auto",
    output: str = "dict",
    blocks: str = "full",
    max_bytes: int | None = None,
    create_graph: bool = False,
) -> dict | Tensor:
    """The Hessian of the loss in the parameters, exact and exactly symmetric.

    The bytes are estimated before allocating; beyond ``max_bytes`` the call is refused with the
    figure and a suggestion.

    Args:
        model, loss_fn, inputs, targets, params, backend: as in :func:`hessext.hvp`.
        output: ``"dict"``, the torch.func layout (``H[name1][name2].shape == p1.shape + p2.shape``),
            or ``"matrix"``, a dense ``[P, P]`` tensor in ``named_parameters()`` flatten order.
        blocks: ``"full"``, or ``"layer"`` for the per-layer diagonal blocks only (the dict holds
            the same-layer pairs; the matrix form is a list of one ``[P_l, P_l]`` per layer).
        max_bytes: the memory the call may take (default: the memory available).
        create_graph: as in :func:`hessext.hvp` (True: differentiable, through torch.func).

    Returns:
        The Hessian in the layout ``output`` and ``blocks`` ask for.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        >>> x, y = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> H = hessext.hessian(model, nn.MSELoss(), x, y, output="matrix")
        >>> H.shape, bool((H == H.T).all())
        (torch.Size([17, 17]), True)
    """
    model = unwrap(model)
    if torch.compiler.is_compiling():
        return compiled.hessian(
            model,
            loss_fn,
            inputs,
            targets,
            params=params,
            backend=backend,
            output=output,
            blocks=blocks,
            max_bytes=max_bytes,
            create_graph=create_graph,
        )
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if blocks not in BLOCKS:
        raise ValueError(f"blocks must be one of {BLOCKS}, got {blocks!r}")
    check_max_bytes(max_bytes)
    call = route(model, loss_fn, inputs, targets, params, backend, create_graph=create_graph)
    plan, native, tensors = call.plan, call.native, call.tensors
    ref = tensors[0]
    sizes = [t.numel() for t in tensors]
    chosen = set(call.sel)
    layers = _layers(plan)
    groups = [list(call.sel)] if blocks == "full" else [[j for j in g if j in chosen] for g in layers]
    groups = [g for g in groups if g]
    group_sizes = [sum(sizes[j] for j in g) for g in groups]
    result = sum(n * n for n in group_sizes) * ref.element_size()
    per_vector = (
        0
        if native
        else fallback.HVP_GRAPHS * fallback.graph_bytes(model, loss_fn, inputs, targets, call.fallback_params())
    )
    work = _native_peak(call, inputs, blocks) if native else _fallback_peak(result, ref, max(group_sizes), per_vector)
    reordered = native and output == "matrix" and plan.stack_order != sorted(plan.stack_order)
    _check_memory(
        f"hessext.hessian(blocks={blocks!r}, output={output!r}) of "
        f"{sum(group_sizes) if blocks == 'full' else sum(sizes[j] for j in call.sel)} parameters",
        work + (result if reordered else 0),
        ref,
        max_bytes,
        ("use blocks='layer' for the block-diagonal Hessian, or " if blocks == "full" else "use ")
        + "hessext.hvp for products",
    )
    if native:
        mats = _native_raw(ops.hessian, call, inputs, targets, blocks == "layer")
        order = [plan.stack_order] if blocks == "full" else layers  # stack order within each matrix
        if call.partial:  # the kernels take every parameter: keep the rows and columns of the chosen ones
            mats, order = zip(
                *[
                    (_restrict(m, o, sizes, chosen), [j for j in o if j in chosen])
                    for m, o in zip(mats, order)
                    if any(j in chosen for j in o)
                ]
            )
    else:
        with fallback.batch_statistics(model):
            mats = [_fallback_block(model, loss_fn, inputs, targets, call, g, per_vector) for g in groups]
        order = groups
    if blocks == "layer":  # layers listed in the order their parameters appear in named_parameters()
        mats, order = zip(*sorted(zip(mats, order), key=lambda pair: min(pair[1])))
    if output == "matrix":
        mats = [_to_named_order(m, [sizes[j] for j in o], o) for m, o in zip(mats, order)]
        return mats[0] if blocks == "full" else mats
    names = plan.param_names
    result = {names[j]: {} for j in call.sel}
    for m, o in zip(mats, order):
        starts = torch.tensor([0] + [sizes[j] for j in o]).cumsum(0).tolist()
        for a, ja in enumerate(o):
            for b, jb in enumerate(o):
                block = m[starts[a] : starts[a + 1], starts[b] : starts[b + 1]]
                result[names[ja]][names[jb]] = block.reshape(tensors[ja].shape + tensors[jb].shape)
    return {n: {k: result[n][k] for k in result if k in result[n]} for n in result}


def _restrict(matrix, order, sizes, chosen):
    """The rows and columns of `matrix` (over the parameters `order`) that belong to `chosen` ones."""
    starts = torch.tensor([0] + [sizes[j] for j in order]).cumsum(0).tolist()
    index = torch.cat([torch.arange(starts[k], starts[k + 1]) for k, j in enumerate(order) if j in chosen])
    index = index.to(matrix.device)
    return matrix[index[:, None], index]


def _native_peak(call, inputs, blocks):
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
    mc = max(1, min(M, _HESSIAN_CHUNK_ELEMS // widest, 256 if acc_es != es else M))
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
    small = blocks == "full" and maxw <= 64 and M * P * P <= _FUSED_HESSIAN_WORK  # PathChoice::fused_hessian
    fused = (torch.get_num_threads() + 1) * P * P * es if small else 0
    activations = 4 * M * (shapes[0][1] + sum(o for o, _ in shapes)) * es
    scatter = max(rows) * 8 if acc_es != es else 0  # a float64 block cast for H's float32 entries
    peak = max(acc + chunk, acc + result + scatter + 256 * 256 * es * 2, fused) + activations
    return int(peak * 1.1) + _SLACK


def _fallback_peak(result, ref, P, per_vector):
    """Bytes the torch.func basis products hold: the result, its rows before they are joined, and
    per chunk the basis vectors, their products and the vmapped graphs behind them (a chunk holds
    about fallback.CHUNK_BYTES of vectors and graphs, or one vector's; measured on MLPs: about five
    chunks' bytes with tanh, 7.8 with softsign)."""
    one = P * ref.element_size() + per_vector
    chunk = min(max(fallback.CHUNK_BYTES, one), P * one)
    return int((2 * result + 9 * chunk) * 1.1) + _SLACK


def _to_named_order(matrix, sizes, order):
    """A matrix whose rows/columns run over the parameters `order` -> rows/columns in named order (one
    gather: one more matrix, counted in the memory estimate)."""
    if order == sorted(order):
        return matrix
    starts = torch.tensor([0] + sizes).cumsum(0).tolist()
    pieces = {j: torch.arange(starts[k], starts[k + 1]) for k, j in enumerate(order)}
    index = torch.cat([pieces[j] for j in sorted(order)]).to(matrix.device)
    return matrix[index[:, None], index]


def _fallback_block(model, loss_fn, inputs, targets, call, group, per_vector):
    """Rows/columns `group` of the Hessian through torch.func HVPs with basis vectors, symmetrised."""
    p = call.fallback_params()  # the chosen parameters; the others are the module's own
    names = [call.plan.param_names[j] for j in group]
    sub = {n: p[n] for n in names}

    def product(vectors):
        full = {
            n: vectors[n]
            if n in vectors
            else torch.zeros((next(iter(vectors.values())).shape[0],) + t.shape, dtype=t.dtype, device=t.device)
            for n, t in p.items()
        }
        out = fallback.hvp(model, loss_fn, inputs, targets, p, full, keep_graph=call.traced)
        return {n: out[n] for n in names}

    H = fallback.basis_matrix(product, sub, "Hessian", per_vector)
    return (H + H.T) / 2 if call.traced else symmetrize_(H)


def symmetrize_(H, tile=256):
    """H <- (H + H^T) / 2 in place, tile by tile (no second matrix)."""
    n = H.shape[0]
    for r in range(0, n, tile):
        for c in range(r, n, tile):
            upper, lower = H[r : r + tile, c : c + tile], H[c : c + tile, r : r + tile]
            mean = (upper + lower.T) / 2
            upper.copy_(mean)
            lower.copy_(mean.T)
    return H


def _needs_graph(call, *batch):
    """Input derivatives are values of the model, differentiable like its output: whether this one
    must carry a gradient (grad mode on, and a parameter, the inputs or the targets require grad)."""
    return (
        not call.traced
        and torch.is_grad_enabled()
        and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (*batch, *call.tensors))
    )


def _through_torch_func(call, what):
    """Carry the gradient through torch.func on the live tensors; backend='native' raises."""
    call.keep_graph(
        f"{what} is differentiated here (grad mode on, and a parameter or the inputs require "
        f"grad), which the kernels cannot yet; call it under torch.no_grad() or with "
        f"parameters that do not require grad for the native forward"
    )


def input_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    diagonal: bool = False,
    params: Params = None,
    backend: str = "auto",
    max_bytes: int | None = None,
) -> Tensor:
    """For each sample, the Hessian of the loss in that sample's input row.

    The diagonal blocks of torch.func's ``[N, d, N, d]`` (the others are zero). Differentiable like
    the model's output: in grad mode, when a parameter, the inputs or the targets require grad, the
    result carries their gradient (for the stacks the kernels serve, through the reverse pass of
    their jets on the CPU; else through torch.func); otherwise the kernels compute it, detached.

    Args:
        model, loss_fn, inputs, targets, params, backend: as in :func:`hessext.hvp`; ``inputs`` is
            ``[N, *features]`` with d features per sample.
        diagonal: True returns only the diagonal of each Hessian.
        max_bytes: the memory the call may take (default: the memory available).

    Returns:
        ``[N, d, d]``, or ``[N, d]`` with ``diagonal=True``.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3), nn.LogSoftmax(dim=-1))
        >>> x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
        >>> with torch.no_grad():
        ...     hessext.input_hessian(model, nn.NLLLoss(), x, y).shape
        torch.Size([10, 5, 5])
    """
    model = unwrap(model)
    if torch.compiler.is_compiling():
        return compiled.input_derivatives(
            "diagonal" if diagonal else "full",
            model,
            loss_fn,
            inputs,
            targets,
            params=params,
            backend=backend,
            max_bytes=max_bytes,
        )
    check_max_bytes(max_bytes)
    if not isinstance(diagonal, bool):
        raise TypeError(f"diagonal must be True or False, got {diagonal!r}")
    call = route(model, loss_fn, inputs, targets, params, backend)
    check_samples(inputs, "input_hessian")
    if _needs_graph(call, inputs, targets):
        stack = _native_stack(call, inputs, "input_hessian carrying a gradient")
        if stack is not None:
            return _input_hessian_graph(call, loss_fn, inputs, targets, diagonal, max_bytes, stack)
        _through_torch_func(call, "input_hessian")
    N = inputs.shape[0]
    d = inputs[0].numel()
    mode = 1 if diagonal else 2
    batch = native_batch(call.plan, inputs, targets, call.tensors) if call.native else None
    native = batch is not None and rows_are_samples(inputs, batch[0])
    out = N * d * (1 if diagonal else d) * inputs.element_size()
    per_vector = (
        0
        if native
        else fallback.HVP_GRAPHS * fallback.graph_bytes(model, loss_fn, inputs, targets, call.fallback_params())
    )
    _check_memory(
        f"hessext.input_hessian(diagonal={diagonal}) of {N} samples x {d} features",
        _jet_peak(call, N, mode) if native else _fallback_input_peak(out, per_vector, N, d, inputs),
        inputs,
        max_bytes,
        ("use " if diagonal else "use diagonal=True, or ") + "fewer samples at a time",
    )
    if native:
        return run_native(ops.input_derivatives, call, *batch, mode)
    with fallback.batch_statistics(model):
        return _input_hessian_fallback(model, loss_fn, inputs, targets, call, diagonal, per_vector)


def _native_stack(call, inputs, what, model_output=False):
    """(x [N, d], the output shape, C) where the captured stack serves this call's jets (its rows are
    the samples; for derivatives of the model output, no final log_softmax), else None. On a device
    other than the CPU the jets' reverse pass is autograd's through torch ops: backend='native' raises."""
    if not call.native:
        return None
    x, out_shape, C = native_inputs(call.plan, inputs, call.tensors)
    if not rows_are_samples(inputs, x) or (model_output and call.plan.stack.log_softmax is not None):
        return None
    if inputs.device.type != "cpu" and call.backend == "native":
        call.leave_native(f"on {inputs.device.type}, {what} takes the jets in torch ops (use backend='auto')")
    return x, out_shape, C


def _stack_jet(call, x, C, mode, features, graph):
    """The output jet [1 + k + q, M, C] of the captured stack at rows x: the kernels' jets with their
    reverse pass as the autograd formula (CPU), or the same jets in torch ops (jets.py: other devices)."""
    if x.device.type == "cpu":
        return run_native(ops.output_jets, call, x, x.new_zeros(()).expand(x.shape[0], C), 1.0, mode, features, graph)
    weights, biases = _stack_args(call.plan, call.tensors)
    with torch.set_grad_enabled(graph):
        return jets.output_jet([a.fn for a in call.plan.stack.activations], weights, biases, x, features, mode)


def _graph_jet_bytes(call, N, k, mode, es):
    """Bytes the differentiable jets hold: every layer's channels, twice for a hidden layer (before and
    after its activation, kept for the reverse pass), and the reverse pass's gradients of them."""
    outs = sum(call.tensors[j].shape[0] for j in call.plan.weight_pos)
    return int(N * (1 + k + ops.jet_channels(mode, k)) * outs * es * 4 * 1.1) + _SLACK


def _loss_head(plan, loss_fn, u, targets, out_shape):
    """(g [M, C], H [M, C, C]): the gradient of the loss in the stack's output rows u [M, C] and each
    row's Hessian block, by autograd through loss_fn on the model's output (the native losses are sums
    over the rows: the blocks off the diagonal are zero), with their graphs kept for the backward."""
    with torch.enable_grad():
        t = u if u.requires_grad else u.detach().requires_grad_()
        out = torch.log_softmax(t, -1) if plan.stack.log_softmax is not None else t
        (g,) = torch.autograd.grad(loss_fn(out.reshape(out_shape), targets), t, create_graph=True)
        rows = []
        for c in range(t.shape[1]):
            (row,) = torch.autograd.grad(g[:, c].sum(), t, create_graph=True, allow_unused=True)
            rows.append(row if row is not None else torch.zeros_like(t))
    return g, torch.stack(rows, 1)


def _input_hessian_graph(call, loss_fn, inputs, targets, diagonal, max_bytes, stack):
    """The input Hessian carrying its gradient: sum_{c,c'} Jz[c,i] H[c,c'] Jz[c',j] + sum_c g_c Sz[c,(i,j)]
    (csrc/jets.h) from the stack's differentiable output jet (the unmixed or all second derivatives) and
    the loss's per-row gradient g and Hessian H by autograd; autograd's reverse pass of this sum feeds the
    jets' own (the kernels' on the CPU)."""
    x, out_shape, C = stack
    N, d = x.shape
    mode = 1 if diagonal else 2
    _check_memory(
        f"hessext.input_hessian(diagonal={diagonal}) of {N} samples x {d} features carrying a gradient",
        _graph_jet_bytes(call, N, d, mode, x.element_size()),
        inputs,
        max_bytes,
        ("use " if diagonal else "use diagonal=True, or ") + "fewer samples at a time",
    )
    jet = _stack_jet(call, x, C, mode, list(range(d)), True)
    g, H = _loss_head(call.plan, loss_fn, jet[0], targets, out_shape)
    J = jet[1 : 1 + d].permute(1, 0, 2)  # [N, d, C]
    curvature = torch.einsum("qnc,nc->nq", jet[1 + d :], g)  # [N, q]
    HJ = torch.matmul(J, H)  # [N, d, C] (H symmetric)
    if diagonal:
        return (HJ * J).sum(2) + curvature
    first, second = jets.pair_index(mode, d)
    channel = torch.empty(d, d, dtype=torch.long)
    channel[first, second] = torch.arange(len(first))
    channel[second, first] = torch.arange(len(first))
    return torch.matmul(HJ, J.transpose(1, 2)) + curvature[:, channel.reshape(-1).to(x.device)].reshape(N, d, d)


def _jet_peak(call, M, mode):
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
        work = 3 * min(M * widest, torch.get_num_threads() * _HESSIAN_CHUNK_ELEMS) * es
    peak = int((work + 2 * result) * 1.1) + _SLACK
    remember(plan.peaks, key, peak, 64)
    return peak


def _fallback_input_peak(result, per_vector, N, d, like):
    """Bytes the torch.func input derivatives hold: the result and its pieces, and per chunk of
    directions their basis, products and graphs (as `_fallback_peak`)."""
    one = per_vector + 2 * N * d * like.element_size()
    chunk = min(max(fallback.CHUNK_BYTES, one), N * d * one)
    return int((2 * result + 9 * chunk) * 1.1) + _SLACK


def _probe_rows(N, like):
    """A 0/1 mask [N] of probe samples: sample 0 and a fixed pseudo-random half of the others."""
    rng = random.Random(N)
    mask = torch.tensor([j == 0 or rng.random() < 0.5 for j in range(N)])
    if N > 1 and bool(mask.all()):
        mask[-1] = False
    return mask.to(device=like.device)


def _reaches_other_rows(apply, N, shape, like):
    """Whether `apply` (a linear map of [N, *shape] row blocks, such as an input HVP or the model's
    vjp) carries a block supported on the probe samples into any other sample's rows: the samples
    are coupled (a batch statistic in forward or loss). Exact zeros are expected otherwise. Under a
    torch.func transform the values cannot be read: the samples are taken as coupled (the exact path)."""
    if N == 1:
        return False
    if transformed(like):
        return True
    mask = _probe_rows(N, like)
    g = torch.Generator().manual_seed(1)
    v = torch.randn((N,) + tuple(shape), generator=g, dtype=torch.float64).to(like)
    out = apply(v * mask.reshape((N,) + (1,) * len(shape)).to(like.dtype))
    return bool((out[~mask] != 0).any())


def _directions(N, shape, features, like, coupled, start, count):
    """`count` basis directions in the inputs [count, N, *shape] from `start`, over the input `features`
    (k of them): each along one feature in every sample at once (k directions, independent samples),
    or along one feature of one sample (N k directions, coupled samples; direction q is feature
    features[q % k] of sample q // k)."""
    d, k = int(torch.Size(shape).numel()), len(features)
    if not coupled:
        eye = torch.eye(d, dtype=like.dtype, device=like.device)[features[start : start + count]]
        return eye.reshape((count, 1) + shape).expand((count, N) + shape)
    q = torch.arange(start, start + count)
    flat = (q // k) * d + torch.tensor(features)[q % k]
    basis = torch.zeros(count, N * d, dtype=like.dtype, device=like.device)
    basis[torch.arange(count), flat.to(like.device)] = 1
    return basis.reshape((count, N) + shape)


def _chunks(N, d, k, es, coupled, per_vector):
    """(start, count) chunks of the directions (k of them, or N k where the samples are coupled), each
    chunk's basis, products and graphs (`per_vector` bytes a direction) within fallback.CHUNK_BYTES."""
    total = N * k if coupled else k
    step = max(1, fallback.CHUNK_BYTES // max(1, 2 * N * d * es + per_vector))
    return [(q, min(step, total - q)) for q in range(0, total, step)]


def _input_hessian_fallback(model, loss_fn, inputs, targets, call, diagonal, per_vector):
    """HVPs in the inputs: d of them, each along one feature direction in every sample at once, when
    the samples are independent (each product then holds one column of every sample's block);
    N d of them, one feature of one sample each, when forward or the loss couples the samples."""
    N, shape = inputs.shape[0], inputs.shape[1:]
    d = inputs[0].numel()
    params = call.fallback_params()

    def f(x):
        return loss_fn(functional_call(model, params, (x,)), targets)

    x = call.result(inputs)
    with torch.enable_grad():
        _, vjp_fn = vjp(grad(f), x)
        coupled = _reaches_other_rows(lambda v: vjp_fn(v)[0], N, shape, x)
        columns = []
        features = list(range(d))
        for start, count in _chunks(N, d, d, x.element_size(), coupled, per_vector):
            out = vmap(vjp_fn)(_directions(N, shape, features, x, coupled, start, count))[0].reshape(count, N, d)
            if coupled:  # direction q: column q % d of sample q // d's block
                out = out[
                    torch.arange(count, device=x.device), torch.arange(start, start + count, device=x.device) // d
                ]
            columns.append(out)
    cols = torch.cat(columns)  # [direction, N, d]: independent samples; [direction, d]: coupled
    cols = cols.reshape(N, d, d).transpose(1, 2) if coupled else cols.permute(1, 2, 0)  # [n, i, j] = H_n[i, j]
    H = call.result(cols)
    H = (H + H.transpose(1, 2)) / 2
    return torch.diagonal(H, dim1=1, dim2=2).contiguous() if diagonal else H


def laplacian(
    model: nn.Module,
    inputs: Tensor,
    *,
    dims: Sequence[int] | None = None,
    params: Params = None,
    backend: str = "auto",
    max_bytes: int | None = None,
) -> Tensor:
    """For each sample and output, the Laplacian of the model output in that sample's inputs.

    The sum of the unmixed second derivatives over the input features ``dims``, from one
    forward-mode pass. Differentiable like the model's output: in grad mode, when a parameter or the
    inputs require grad, the result carries their gradient, so a physics-informed loss trains
    through it (on the CPU the kernels' reverse pass; on CUDA the same recurrence in torch ops;
    other models through torch.func). Under ``torch.no_grad()``, or with frozen parameters and plain
    inputs, the kernels compute it detached and keep nothing.

    Args:
        model: an ``nn.Module`` of inputs ``[N, *features]``.
        inputs: the points, ``[N, *features]``.
        dims: the input features the sum runs over (a list of indices, e.g. the space coordinates
            and not time), or None for all.
        params, backend: as in :func:`hessext.hvp`.
        max_bytes: the memory the call may take (default: the memory available); the bytes are
            estimated first.

    Returns:
        A tensor shaped like the model output, ``[N, C]``.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        >>> x = torch.rand(32, 2, dtype=torch.float64)
        >>> loss = (hessext.laplacian(model, x) ** 2).mean()   # a PDE residual's loss
        >>> loss.backward()                                      # trains through the Laplacian
        >>> model[0].weight.grad.shape
        torch.Size([16, 2])
    """
    model = unwrap(model)
    if torch.compiler.is_compiling():
        return compiled.input_derivatives(
            "laplacian",
            model,
            _MODEL_ONLY,
            inputs,
            None,
            dims=dims,
            params=params,
            backend=backend,
            max_bytes=max_bytes,
        )
    return _input_jets(model, inputs, dims, params, backend, max_bytes, "laplacian")[2]


def value_gradient_laplacian(
    model: nn.Module,
    inputs: Tensor,
    *,
    dims: Sequence[int] | None = None,
    params: Params = None,
    backend: str = "auto",
    max_bytes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The model output, its input gradient and its Laplacian, from one forward-mode pass.

    The three a PDE residual with first-order terms (heat, advection, Burgers) needs.
    Differentiable as :func:`hessext.laplacian` is; detached under ``torch.no_grad()``.

    Args:
        model, inputs, params, backend, max_bytes: as in :func:`hessext.laplacian`.
        dims: the k input features of the gradient and the Laplacian (None: all d).

    Returns:
        ``(u, grad_u, lap_u)``: ``u`` shaped like the output ``[N, *out]``, ``grad_u``
        ``[N, *out, k]`` and ``lap_u`` ``[N, *out]``.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        >>> x = torch.rand(32, 3, dtype=torch.float64)       # (t, x, y): time first
        >>> u, grad_u, lap_u = hessext.value_gradient_laplacian(model, x, dims=[1, 2])
        >>> tuple(u.shape), tuple(grad_u.shape), tuple(lap_u.shape)
        ((32, 1), (32, 1, 2), (32, 1))
    """
    model = unwrap(model)
    if torch.compiler.is_compiling():
        return compiled.input_derivatives(
            "value_gradient_laplacian",
            model,
            _MODEL_ONLY,
            inputs,
            None,
            dims=dims,
            params=params,
            backend=backend,
            max_bytes=max_bytes,
        )
    return _input_jets(model, inputs, dims, params, backend, max_bytes, "value_gradient_laplacian")


def _input_jets(model, inputs, dims, params, backend, max_bytes, what):
    """(u, grad u, lap u) shaped like the output: the kernels' Laplacian where only it is asked for,
    over every feature and with no gradient; else, for a stack the kernels serve, the kernels' jets
    with their reverse pass as the autograd formula (CPU) or the same jets in torch ops (jets.py:
    CUDA); else torch.func."""
    check_max_bytes(max_bytes)
    call = route(model, _MODEL_ONLY, inputs, None, params, backend, targets_needed=False)
    check_samples(inputs, what)
    N, d = inputs.shape[0], math.prod(inputs.shape[1:])
    graph = _needs_graph(call, inputs)
    if call.native and not graph and dims is None and what == "laplacian":  # the common call, first
        x, out_shape, C = native_inputs(call.plan, inputs, call.tensors)
        if rows_are_samples(inputs, x) and call.plan.stack.log_softmax is None:
            _check_memory(
                f"hessext.{what} of {N} samples x {d} features",
                _jet_peak(call, N, 0),
                inputs,
                max_bytes,
                "use fewer samples at a time",
            )
            return (
                None,
                None,
                run_native(ops.input_derivatives, call, x, x.new_zeros(()).expand(N, C), 1.0, 0).reshape(out_shape),
            )
    features = jets.check_dims(dims, d)
    stack = _native_stack(
        call,
        inputs,
        what + (" with dims" if dims is not None else "") + (" carrying a gradient" if graph else ""),
        model_output=True,
    )
    if graph and stack is None:
        _through_torch_func(call, what)
    if stack is not None:
        _check_memory(
            f"hessext.{what} of {N} samples x {d} features",
            _graph_jet_bytes(call, N, len(features), 0, inputs.element_size()) // (1 if graph else 2),
            inputs,
            max_bytes,
            "use fewer samples at a time",
        )
        x, out_shape, C = stack
        jet = _stack_jet(call, x, C, 0, features, graph)
        k = len(features)
        return (
            jet[0].reshape(out_shape),
            jet[1 : 1 + k].permute(1, 2, 0).reshape(tuple(out_shape) + (k,)),
            jet[1 + k].reshape(out_shape),
        )
    per_vector = fallback.HVP_GRAPHS * fallback.graph_bytes(model, None, inputs, None, call.fallback_params())
    _check_memory(
        f"hessext.{what} of {N} samples x {d} features",
        _fallback_input_peak(0, per_vector, N, d, inputs),
        inputs,
        max_bytes,
        "use fewer samples at a time",
    )
    with fallback.batch_statistics(model):
        return _jets_fallback(model, inputs, call, per_vector, features)


def _jets_fallback(model, inputs, call, per_vector, features):
    """(u, grad u [N, *out, k], lap u) by forward-over-forward mode along one feature direction at a
    time: in every sample at once when the samples are independent; one feature of one sample each
    (that sample's output row kept) when forward couples the samples."""
    p = call.fallback_params()
    N, shape = inputs.shape[0], inputs.shape[1:]
    d, k = inputs[0].numel(), len(features)
    x = call.result(inputs)

    def out_fn(xx):
        return functional_call(model, p, (xx,))

    def both(v):  # (d/dt, d^2/dt^2) of model(x + t v) at t = 0
        return jvp(lambda xx: jvp(out_fn, (xx,), (v,))[1], (x,), (v,))

    with torch.enable_grad():
        out, vjp_out = vjp(out_fn, x)
    coupled = out.dim() == 0 or out.shape[0] != N or _reaches_other_rows(lambda u: vjp_out(u)[0], N, out.shape[1:], x)
    if coupled and (out.dim() == 0 or out.shape[0] != N):
        raise ValueError(
            f"laplacian: the model's output of shape {tuple(out.shape)} has no row per sample "
            f"(inputs hold {N} samples); the Laplacian is taken per sample and output"
        )
    grads = out.new_zeros((k,) + tuple(out.shape))
    lap = torch.zeros_like(out)
    for start, count in _chunks(N, d, k, x.element_size(), coupled, per_vector):
        first, second = vmap(both)(_directions(N, shape, features, x, coupled, start, count))  # [count, N, *out]
        if coupled:  # direction q: feature q % k of sample q // k, whose output row it adds to
            q = torch.arange(start, start + count, device=x.device)
            rows, taken = q // k, torch.arange(count, device=x.device)
            lap = lap.index_add(0, rows, second[taken, rows])
            grads = grads.index_put((q % k, rows), first[taken, rows], accumulate=True)
        else:
            lap = lap + second.sum(0)
            grads = torch.cat([grads[:start], first, grads[start + count :]])
    grad = grads.permute(tuple(range(1, grads.dim())) + (0,))
    return call.result(out), call.result(grad), call.result(lap)
