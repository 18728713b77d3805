"""Full Hessians: with respect to the weights (dense or block-diagonal, dict or matrix) and to the
inputs (per-sample input Hessians of the loss, Laplacians of the model output).

Each call: plan (cached capture) -> argument checks (and a memory estimate before allocating) ->
one native op or the torch.func fallback -> results shaped like the user's parameters/inputs."""
import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from hessext import fallback, ops
from hessext.curvature import _native_raw, _stack_args, route
from hessext.inputs import check_samples, native_inputs, rows_are_samples

OUTPUTS = ("dict", "matrix")
BLOCKS = ("full", "layer")
_MODEL_ONLY = nn.MSELoss()  # the loss a model-only quantity (the Laplacian) is planned with


def available_bytes(device):
    """Memory a new tensor can take on `device`: free GPU memory, or MemAvailable on the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 2**62


def _check_memory(what, nbytes, ref, max_bytes, hint):
    if max_bytes is None and nbytes < 2**28:  # small requests fit anywhere; skip reading the free memory
        return
    limit = available_bytes(ref.device) if max_bytes is None else max_bytes
    if nbytes > limit:
        raise ValueError(f"{what} would need {nbytes:,} bytes, more than the {limit:,} bytes available "
                         f"on {ref.device}; {hint}")


def _layers(plan):
    """Groups of parameter positions (named order), one per layer: the Linear layers of a native stack,
    else the parameters of each module."""
    if plan.stack is not None:
        return [[j for j in (w, b) if j is not None] for w, b in zip(plan.weight_pos, plan.bias_pos)]
    groups = {}
    for j, name in enumerate(plan.param_names):
        groups.setdefault(name.rpartition(".")[0], []).append(j)
    return list(groups.values())


def hessian(model, loss_fn, inputs, targets, *, params=None, backend="auto", output="dict", blocks="full",
            max_bytes=None):
    """The Hessian of the loss in the parameters, exact and exactly symmetric.

    output="dict": the torch.func layout, H[name1][name2].shape == p1.shape + p2.shape;
    output="matrix": a dense [P, P] tensor in named_parameters() flatten order.
    blocks="layer": only the per-layer diagonal blocks (the block-diagonal Hessian): the dict holds
    only same-layer pairs; the matrix form is a list of one [P_l, P_l] matrix per layer.
    The bytes are estimated before allocating; beyond `max_bytes` (default: the memory available)
    the call is refused with the figure and a suggestion."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if blocks not in BLOCKS:
        raise ValueError(f"blocks must be one of {BLOCKS}, got {blocks!r}")
    call = route(model, loss_fn, inputs, targets, params, backend)
    plan, native, tensors = call.plan, call.native, call.tensors
    ref = tensors[0]
    sizes = [t.numel() for t in tensors]
    groups = [list(range(len(tensors)))] if blocks == "full" else _layers(plan)
    group_sizes = [sum(sizes[j] for j in g) for g in groups]
    # the result, plus (native) the block accumulators: the lower triangle of blocks, or the layer blocks again
    extra = sum(n * n for n in group_sizes) // (2 if blocks == "full" else 1) if native else 0
    _check_memory(f"hessext.hessian(blocks={blocks!r}) of {sum(sizes)} parameters",
                  (sum(n * n for n in group_sizes) + extra) * ref.element_size(), ref, max_bytes,
                  ("use blocks='layer' for the block-diagonal Hessian, or " if blocks == "full" else "use ")
                  + "hessext.hvp for products")
    if native:
        mats = _native_raw(ops.hessian, call, inputs, targets, blocks == "layer")
        order = [plan.stack_order] if blocks == "full" else groups  # stack order within each matrix
    else:
        mats = [_fallback_block(model, loss_fn, inputs, targets, call, g) for g in groups]
        order = groups
    if blocks == "layer":  # layers listed in the order their parameters appear in named_parameters()
        mats, order = zip(*sorted(zip(mats, order), key=lambda pair: min(pair[1])))
    if output == "matrix":
        mats = [_to_named_order(m, [sizes[j] for j in o], o) for m, o in zip(mats, order)]
        return mats[0] if blocks == "full" else mats
    result = {n: {} for n in plan.param_names}
    for m, o in zip(mats, order):
        starts = torch.tensor([0] + [sizes[j] for j in o]).cumsum(0).tolist()
        for a, ja in enumerate(o):
            for b, jb in enumerate(o):
                block = m[starts[a]:starts[a + 1], starts[b]:starts[b + 1]]
                result[plan.param_names[ja]][plan.param_names[jb]] = block.reshape(tensors[ja].shape + tensors[jb].shape)
    return {n: {k: result[n][k] for k in plan.param_names if k in result[n]} for n in plan.param_names}


def _to_named_order(matrix, sizes, order):
    """A matrix whose rows/columns run over the parameters `order` -> rows/columns in named order."""
    if order == sorted(order):
        return matrix
    starts = torch.tensor([0] + sizes).cumsum(0).tolist()
    pieces = {j: torch.arange(starts[k], starts[k + 1]) for k, j in enumerate(order)}
    index = torch.cat([pieces[j] for j in sorted(order)]).to(matrix.device)
    return matrix.index_select(0, index).index_select(1, index)


def _fallback_block(model, loss_fn, inputs, targets, call, group):
    """Rows/columns `group` of the Hessian through torch.func HVPs with basis vectors, symmetrised."""
    p = call.fallback_params()
    names = [call.plan.param_names[j] for j in group]
    sub = {n: p[n] for n in names}

    def product(vectors):
        full = {n: vectors[n] if n in vectors else torch.zeros((next(iter(vectors.values())).shape[0],) + t.shape,
                                                               dtype=t.dtype, device=t.device)
                for n, t in p.items()}
        out = fallback.hvp(model, loss_fn, inputs, targets, p, full)
        return {n: out[n] for n in names}

    H = fallback.basis_matrix(product, sub, "Hessian")
    return (H + H.T) / 2


def input_hessian(model, loss_fn, inputs, targets, *, diagonal=False, params=None, backend="auto", max_bytes=None):
    """For each sample n, the Hessian of the loss with respect to that sample's input row: [N, d, d]
    (the diagonal blocks of torch.func's [N, d, N, d]; the others are zero), or its diagonal [N, d]
    with diagonal=True. d is the number of input features per sample (inputs [N, *features])."""
    call = route(model, loss_fn, inputs, targets, params, backend)
    check_samples(inputs, "input_hessian")
    N = inputs.shape[0]
    d = inputs[0].numel()
    _check_memory(f"hessext.input_hessian of {N} samples x {d} features", N * d * (1 if diagonal else d) *
                  inputs.element_size(), inputs, max_bytes, "use diagonal=True, or fewer samples at a time")
    if call.native and rows_are_samples(inputs, native_inputs(call.plan, inputs, call.tensors)[0]):
        return _native_raw(ops.input_derivatives, call, inputs, targets, 1 if diagonal else 2)
    return _input_hessian_fallback(model, loss_fn, inputs, targets, call, diagonal)


def _input_hessian_fallback(model, loss_fn, inputs, targets, call, diagonal):
    """d HVPs in the inputs, each along one feature direction in every sample at once (samples are
    independent, so each product holds one column of every sample's block)."""
    N, shape = inputs.shape[0], inputs.shape[1:]
    d = inputs[0].numel()
    params = call.fallback_params()

    def f(x):
        return loss_fn(functional_call(model, params, (x,)), targets)

    x = call.result(inputs)
    with torch.enable_grad():
        _, vjp_fn = vjp(grad(f), x)
        basis = torch.eye(d, dtype=x.dtype, device=x.device).reshape((d, 1) + shape).expand((d, N) + shape)
        cols = vmap(vjp_fn)(basis)[0].reshape(d, N, d)  # [j, n, i] = H_n[i, j]
    H = call.result(cols.permute(1, 2, 0))
    H = (H + H.transpose(1, 2)) / 2
    return torch.diagonal(H, dim1=1, dim2=2).contiguous() if diagonal else H


def laplacian(model, inputs, *, params=None, backend="auto"):
    """For each sample and each output, the sum of the unmixed second derivatives of the model output
    with respect to that sample's inputs: shaped like the model output ([N, C]). Native: one
    forward-mode pass carrying value, first and unmixed second derivatives through the stack."""
    call = route(model, _MODEL_ONLY, inputs, None, params, backend, targets_needed=False)
    check_samples(inputs, "laplacian")
    if call.native:
        x, out_shape, C = native_inputs(call.plan, inputs, call.tensors)
        if rows_are_samples(inputs, x):
            weights, biases = _stack_args(call.plan, call.tensors)
            with torch.no_grad():
                y = x.new_zeros(()).expand(x.shape[0], C)
                return ops.input_derivatives(x, y, weights, biases, call.plan.activations, 1.0, 0).reshape(out_shape)
    p = call.fallback_params()
    N, shape = inputs.shape[0], inputs.shape[1:]
    d = inputs[0].numel()

    def out_fn(x):
        return functional_call(model, p, (x,))

    def second(v):  # d^2/dt^2 model(x + t v) at t = 0, v one feature direction in every sample
        return jvp(lambda x: jvp(out_fn, (x,), (v,))[1], (call.result(inputs),), (v,))[1]

    basis = torch.eye(d, dtype=inputs.dtype, device=inputs.device).reshape((d, 1) + shape).expand((d, N) + shape)
    return call.result(vmap(second)(basis).sum(0))
