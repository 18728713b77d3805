"""The one path every public call takes: plan (the cached capture) -> one check pass -> the native op or
the torch.func fallback -> results in the user's layout. hessext/curvature.py and hessext/hessians.py
hold the public functions; each hands its arguments to one function here.

`route` decides once per call. It takes the plan and the parameters, then checks the batch, its
finiteness and the vectors: in one call into C for the native path's common case
(csrc/arguments.h), else by hessext/inputs.py's checks, which name what is wrong. The call takes the
fallback, with the reason in `Call.why`, wherever the kernels would not compute exactly what torch
computes; backend='native' then raises with that reason."""

import math

import torch

from hessext import _memory, _native, compiled, fallback, jets, ops
from hessext.compiled import unwrap
from hessext.inputs import (
    capturing,
    check_batch,
    check_params,
    check_samples,
    class_layout,
    finite,
    native_batch,
    native_inputs,
    pack_vectors,
    restorer,
    rows_are_samples,
    transformed,
)
from hessext.plan import resolve

OUTPUTS = ("dict", "matrix")
BLOCKS = ("full", "layer")
MODEL_ONLY = torch.nn.MSELoss()  # the loss a model-only quantity (the Laplacian) is planned with
_functorch_level = torch._C._functorch.maybe_current_level
_is_compiling = torch.compiler.is_compiling


def stack_args(plan, tensors):
    """(weights, biases) in stack order from the parameters in named_parameters() order."""
    weights = [tensors[j] for j in plan.weight_pos]
    biases = [tensors[j] if j is not None else None for j in plan.bias_pos]
    return weights, biases


class Call:
    """One call's route: the plan, the parameter tensors (all of the model's, in named_parameters()
    order) and the positions `sel` of those the quantities are taken in (inputs.check_params), whether
    the kernels serve it, and whether torch.func transforms the arguments (then the fallback runs
    without detaching, so that the result can be differentiated or batched further). `vectors` holds
    the checked vectors of a product call: (items in named order, whether batched, the function that
    puts results back in the user's container)."""

    __slots__ = ("plan", "tensors", "sel", "partial", "native", "traced", "backend", "why", "vectors")

    def __init__(self, plan, tensors, sel, native, backend):
        self.plan, self.tensors, self.sel, self.native, self.backend = plan, tensors, sel, native, backend
        self.partial = len(sel) < len(tensors)  # some parameters left out (frozen, or not named in `params`)
        self.traced = False
        self.why = plan.reason  # why this call is not native (None while it is)
        self.vectors = None

    @property
    def names(self):
        """The names of the parameters the quantities are taken in."""
        return [self.plan.param_names[j] for j in self.sel]

    @property
    def selected(self):
        """Their tensors."""
        return [self.tensors[j] for j in self.sel]

    def check_traced(self, tensors):
        """Leave the native path when torch.func transforms any of `tensors`."""
        if transformed(*tensors):
            if self.backend == "native":
                raise ValueError(
                    "backend='native' cannot run under a torch.func transform (grad, vjp, jvp, vmap): "
                    "the kernels have no derivative of their own; use backend='auto' (torch.func then)"
                )
            self.traced, self.native = True, False
            self.why = "a torch.func transform (grad, vjp, jvp, vmap) differentiates or batches this call"

    def keep_graph(self, why):
        """Differentiate through the result: torch.func on the live tensors, the graph kept (the
        kernels have no backward of their own); backend='native' raises with `why`."""
        self.leave_native(why)
        self.traced = True

    def leave_native(self, why):
        """Take the fallback for this call; backend='native' raises with `why`."""
        if self.backend == "native":
            raise ValueError(f"backend='native' is not possible for this call: {why}")
        self.native, self.why = False, why

    def ggn_split(self):
        """Leave the native path where the GGN is not the kernels' (Plan.ggn_reason)."""
        why = self.plan.ggn_reason() if self.native else None
        if why is not None:
            self.leave_native(why)

    def fallback_params(self):
        """The selected parameters for torch.func (the others: the module's own, in functional_call)."""
        return dict(zip(self.names, self.selected if self.traced else [t.detach() for t in self.selected]))

    def result(self, t):
        return t if self.traced else t.detach()


def check_create_graph(create_graph):
    if not isinstance(create_graph, bool):
        raise TypeError(f"create_graph must be True or False, got {create_graph!r}")


_NO_VECTORS = object()


def route(
    model, loss_fn, inputs, targets, params, backend, *, vectors=_NO_VECTORS, targets_needed=True, create_graph=False
):
    """Plan, argument checks and the native/fallback decision for one call (and, given `vectors`, their
    checks: `Call.vectors`). The native path is taken only for finite inputs and targets (torch's
    NaN/inf propagation is the fallback's; not checked under CUDA-graph capture, which forbids reading
    values back), for cross-entropy only with the classes in the last dim of a [N, C] output, never
    under a torch.func transform and never with create_graph=True (the kernels have no derivative of
    their own); backend='native' raises wherever the call leaves the kernels."""
    check_create_graph(create_graph)
    plan, native = resolve(model, loss_fn, backend)
    tensors, sel = check_params(plan, params)
    call = Call(plan, tensors, sel, native, backend)
    with_vectors = vectors is not _NO_VECTORS
    fast = native and not create_graph and (targets is not None or not targets_needed)
    if fast and _functorch_level() is None:  # the common case, in one C call
        names = call.names
        checked = _native.load().native_arguments(
            inputs,
            targets if targets_needed else None,
            tensors[0],
            plan.target_kind,
            vectors if with_vectors else None,
            names,
            call.selected if with_vectors else [],
        )
        if checked is not None:
            is_finite, found = checked
            if with_vectors:
                call.vectors = (found[0], found[1] > 0, restorer(vectors, names))
            if plan.loss.classes and not class_layout(plan, inputs):
                call.leave_native(_CLASS_LAYOUT)
            elif not is_finite:
                call.leave_native(_NOT_FINITE)
            return call
    check_batch(inputs, targets, tensors[0], plan.loss if native else None, targets_needed)
    batch = (inputs, targets) if targets_needed else (inputs,)
    call.check_traced(batch + tuple(tensors))
    if with_vectors:
        call.vectors = pack_vectors(vectors, call.names, call.selected)
        call.check_traced(call.vectors[0])
    if create_graph and not call.traced:
        call.keep_graph(
            "create_graph=True differentiates through the result, which the kernels cannot "
            "(torch.func computes it; use backend='auto')"
        )
    if call.native and plan.loss.classes and not class_layout(plan, inputs):
        call.leave_native(_CLASS_LAYOUT)
    elif call.native and capturing(inputs):
        # No value can be read back while a CUDA graph is captured: the finiteness check is left out
        # (the captured kernels propagate NaN/inf as they compute them). Class indices are checked and
        # counted on the host; torch's route would differ from the eager call's warm-up, so neither runs.
        if plan.loss.classes and targets is not None and not targets.is_floating_point():
            raise ValueError(
                "targets: class indices are checked and counted on the host, which CUDA graph capture "
                "forbids; capture with class probabilities [N, C] instead "
                "(torch.nn.functional.one_hot(targets, C).to(inputs.dtype))"
            )
    elif call.native and not finite(*batch):
        call.leave_native(_NOT_FINITE)
    return call


_CLASS_LAYOUT = (
    "cross-entropy reads the classes from dim 1 of this output; the kernels need them in the last dim of an "
    "[N, C] output"
)
_NOT_FINITE = "inputs or targets hold NaN or inf, whose propagation torch.func reproduces exactly"


def run_native(name, call, x, y, scale, *extra):
    """The native op `name` (ops.call) on kernel-layout rows x [M, n_0], y [M, C] with the loss scale."""
    weights, biases = stack_args(call.plan, call.tensors)
    return ops.call(name, x, y, weights, biases, *call.plan.spec, scale, *extra)


def native_raw(op, call, inputs, targets, *extra):
    """The native op's own output for this batch."""
    return run_native(op, call, *native_batch(call.plan, inputs, targets, call.tensors), *extra)


def native_call(op, call, inputs, targets, *extra):
    """A native op with per-parameter outputs, for the selected parameters in named_parameters() order."""
    out = native_raw(op, call, inputs, targets, *extra)
    named = [out[slot] for slot in call.plan.stack_slot]
    return [named[j] for j in call.sel] if call.partial else named


# Products ------------------------------------------------------------------------------------------


def products(kind, model, loss_fn, inputs, targets, vectors, params, backend, create_graph):
    """hvp / ggn_vp (`kind`) for the public functions of the same name."""
    model = unwrap(model)
    if _is_compiling():
        return compiled.products(
            kind, model, loss_fn, inputs, targets, vectors, params=params, backend=backend, create_graph=create_graph
        )
    call = route(model, loss_fn, inputs, targets, params, backend, vectors=vectors, create_graph=create_graph)
    if kind == "ggn_vp":
        call.ggn_split()
    vecs, batched, restore = call.vectors
    if call.native:
        plan = call.plan
        full = vecs
        if call.partial:  # the kernels take every parameter: zeros along the left-out ones
            lead = tuple(vecs[0].shape[:1]) if batched else ()
            full = [t.new_zeros(lead + t.shape) for t in call.tensors]
            for v, j in zip(vecs, call.sel):
                full[j] = v
        return restore(native_call(kind, call, inputs, targets, [full[j] for j in plan.stack_order]))
    names = call.names
    vecs = vecs if batched else [v.unsqueeze(0) for v in vecs]  # the fallback takes [K, *shape]
    vecs = dict(zip(names, vecs if call.traced else [v.detach() for v in vecs]))
    op = fallback.hvp if kind == "hvp" else fallback.ggn_vp
    with fallback.batch_statistics(model):
        result = op(model, loss_fn, inputs, targets, call.fallback_params(), vecs, keep_graph=call.traced)
    return restore([call.result(result[n] if batched else result[n][0]) for n in names])


def diag(ggn, model, loss_fn, inputs, targets, params, backend, per_sample, create_graph):
    """hessian_diag / ggn_diag (`ggn`)."""
    model = unwrap(model)
    if _is_compiling():
        return compiled.diag(
            ggn,
            model,
            loss_fn,
            inputs,
            targets,
            params=params,
            backend=backend,
            per_sample=per_sample,
            create_graph=create_graph,
        )
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample must be True or False, got {per_sample!r}")
    call = route(model, loss_fn, inputs, targets, params, backend, create_graph=create_graph)
    if ggn:
        call.ggn_split()
    if call.native:
        return dict(zip(call.names, native_call("diag", call, inputs, targets, ggn, per_sample)))
    if per_sample:
        raise ValueError(
            f"per_sample=True needs the native path (a loss that is a sum over samples); "
            f"this call takes torch.func because {call.why}"
        )
    p = call.fallback_params()
    op = fallback.ggn_vp if ggn else fallback.hvp
    per_vector = fallback.HVP_GRAPHS * fallback.graph_bytes(model, loss_fn, inputs, targets, p)
    with fallback.batch_statistics(model):
        out = fallback.basis_diag(
            lambda v: op(model, loss_fn, inputs, targets, p, v, keep_graph=call.traced),
            p,
            "GGN diagonal" if ggn else "Hessian diagonal",
            per_vector,
        )
    return {n: call.result(t) for n, t in out.items()}


# Dense Hessians ------------------------------------------------------------------------------------


def layers(plan):
    """Groups of parameter positions (named order), one per layer: the Linear layers of a native stack,
    else the parameters of each module."""
    if plan.stack is not None:
        return [[j for j in (w, b) if j is not None] for w, b in zip(plan.weight_pos, plan.bias_pos)]
    groups = {}
    for j, name in enumerate(plan.param_names):
        groups.setdefault(name.rpartition(".")[0], []).append(j)
    return list(groups.values())


def hessian(model, loss_fn, inputs, targets, params, backend, output, blocks, max_bytes, create_graph):
    """The dense Hessian (hessians.hessian)."""
    model = unwrap(model)
    if _is_compiling():
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
    _memory.check_max_bytes(max_bytes)
    call = route(model, loss_fn, inputs, targets, params, backend, create_graph=create_graph)
    plan, native, tensors = call.plan, call.native, call.tensors
    ref = tensors[0]
    sizes = [t.numel() for t in tensors]
    chosen = set(call.sel)
    per_layer = layers(plan)
    groups = [list(call.sel)] if blocks == "full" else [[j for j in g if j in chosen] for g in per_layer]
    groups = [g for g in groups if g]
    group_sizes = [sum(sizes[j] for j in g) for g in groups]
    result = sum(n * n for n in group_sizes) * ref.element_size()
    per_vector = (
        0
        if native
        else fallback.HVP_GRAPHS * fallback.graph_bytes(model, loss_fn, inputs, targets, call.fallback_params())
    )
    if native:
        work = _memory.hessian_peak(call, inputs, blocks)
    else:
        work = _memory.basis_peak(result, ref, max(group_sizes), per_vector)
    reordered = native and output == "matrix" and plan.stack_order != sorted(plan.stack_order)
    _memory.check(
        f"hessext.hessian(blocks={blocks!r}, output={output!r}) of "
        f"{sum(group_sizes) if blocks == 'full' else sum(sizes[j] for j in call.sel)} parameters",
        work + (result if reordered else 0),
        ref,
        max_bytes,
        ("use blocks='layer' for the block-diagonal Hessian, or " if blocks == "full" else "use ")
        + "hessext.hvp for products",
    )
    if native:
        mats = native_raw("hessian", call, inputs, targets, blocks == "layer")
        order = [plan.stack_order] if blocks == "full" else per_layer  # stack order within each matrix
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
            mats = [fallback.hessian_block(model, loss_fn, inputs, targets, call, g, per_vector) for g in groups]
        order = groups
    if blocks == "layer":  # layers listed in the order their parameters appear in named_parameters()
        mats, order = zip(*sorted(zip(mats, order), key=lambda pair: min(pair[1])))
    if output == "matrix":
        mats = [_to_named_order(m, [sizes[j] for j in o], o) for m, o in zip(mats, order)]
        return mats[0] if blocks == "full" else mats
    names = plan.param_names
    result = {names[j]: {} for j in call.sel}
    for m, o in zip(mats, order):
        widths = [sizes[j] for j in o]
        for ja, rows in zip(o, m.split(widths, 0)):  # views: each block a reshaped slice of m
            for jb, block in zip(o, rows.split(widths, 1)):
                result[names[ja]][names[jb]] = block.view(tensors[ja].shape + tensors[jb].shape)
    return {n: {k: result[n][k] for k in result if k in result[n]} for n in result}


def _restrict(matrix, order, sizes, chosen):
    """The rows and columns of `matrix` (over the parameters `order`) that belong to `chosen` ones."""
    starts = torch.tensor([0] + [sizes[j] for j in order]).cumsum(0).tolist()
    index = torch.cat([torch.arange(starts[k], starts[k + 1]) for k, j in enumerate(order) if j in chosen])
    index = index.to(matrix.device)
    return matrix[index[:, None], index]


def _to_named_order(matrix, sizes, order):
    """A matrix whose rows/columns run over the parameters `order` -> rows/columns in named order (one
    gather: one more matrix, counted in the memory estimate)."""
    if order == sorted(order):
        return matrix
    starts = torch.tensor([0] + sizes).cumsum(0).tolist()
    pieces = {j: torch.arange(starts[k], starts[k + 1]) for k, j in enumerate(order)}
    index = torch.cat([pieces[j] for j in sorted(order)]).to(matrix.device)
    return matrix[index[:, None], index]


# Input derivatives ---------------------------------------------------------------------------------


def needs_graph(call, *batch):
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


def input_hessian(model, loss_fn, inputs, targets, diagonal, params, backend, max_bytes):
    """Per-sample input Hessians of the loss (hessians.input_hessian)."""
    model = unwrap(model)
    if _is_compiling():
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
    _memory.check_max_bytes(max_bytes)
    if not isinstance(diagonal, bool):
        raise TypeError(f"diagonal must be True or False, got {diagonal!r}")
    call = route(model, loss_fn, inputs, targets, params, backend)
    check_samples(inputs, "input_hessian")
    if needs_graph(call, inputs, targets):
        stack = native_stack(call, inputs, "input_hessian carrying a gradient")
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
    _memory.check(
        f"hessext.input_hessian(diagonal={diagonal}) of {N} samples x {d} features",
        _memory.jet_peak(call, N, mode) if native else _memory.basis_input_peak(out, per_vector, N, d, inputs),
        inputs,
        max_bytes,
        ("use " if diagonal else "use diagonal=True, or ") + "fewer samples at a time",
    )
    if native:
        return run_native("input_derivatives", call, *batch, mode)
    with fallback.batch_statistics(model):
        return fallback.input_hessian(model, loss_fn, inputs, targets, call, diagonal, per_vector)


def native_stack(call, inputs, what, model_output=False):
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


def stack_jet(call, x, C, mode, features, graph):
    """The output jet [1 + k + q, M, C] of the captured stack at rows x: the kernels' jets with their
    reverse pass as the autograd formula (CPU), or the same jets in torch ops (jets.py: other devices)."""
    weights, biases = stack_args(call.plan, call.tensors)
    if x.device.type == "cpu":
        y = x.new_zeros(()).expand(x.shape[0], C)
        return ops.output_jets(x, y, weights, biases, call.plan.spec, 1.0, mode, features, graph)
    with torch.set_grad_enabled(graph):
        return jets.output_jet([a.fn for a in call.plan.stack.activations], weights, biases, x, features, mode)


def loss_head(plan, loss_fn, u, targets, out_shape):
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
    _memory.check(
        f"hessext.input_hessian(diagonal={diagonal}) of {N} samples x {d} features carrying a gradient",
        _memory.graph_jet_bytes(call, N, d, mode, x.element_size()),
        inputs,
        max_bytes,
        ("use " if diagonal else "use diagonal=True, or ") + "fewer samples at a time",
    )
    jet = stack_jet(call, x, C, mode, list(range(d)), True)
    g, H = loss_head(call.plan, loss_fn, jet[0], targets, out_shape)
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


def input_jets(what, model, inputs, dims, params, backend, max_bytes):
    """laplacian / value_gradient_laplacian (`what`): the Laplacian, or (u, grad u, lap u)."""
    model = unwrap(model)
    if _is_compiling():
        return compiled.input_derivatives(
            what, model, MODEL_ONLY, inputs, None, dims=dims, params=params, backend=backend, max_bytes=max_bytes
        )
    jet = _input_jets(model, inputs, dims, params, backend, max_bytes, what)
    return jet[2] if what == "laplacian" else jet


def _input_jets(model, inputs, dims, params, backend, max_bytes, what):
    """(u, grad u, lap u) shaped like the output: the kernels' Laplacian where only it is asked for,
    over every feature and with no gradient; else, for a stack the kernels serve, the kernels' jets
    with their reverse pass as the autograd formula (CPU) or the same jets in torch ops (jets.py:
    CUDA); else torch.func."""
    _memory.check_max_bytes(max_bytes)
    call = route(model, MODEL_ONLY, inputs, None, params, backend, targets_needed=False)
    check_samples(inputs, what)
    N, d = inputs.shape[0], math.prod(inputs.shape[1:])
    graph = needs_graph(call, inputs)
    if call.native and not graph and dims is None and what == "laplacian":  # the common call, first
        x, out_shape, C = native_inputs(call.plan, inputs, call.tensors)
        if rows_are_samples(inputs, x) and call.plan.stack.log_softmax is None:
            _memory.check(
                f"hessext.{what} of {N} samples x {d} features",
                _memory.jet_peak(call, N, 0),
                inputs,
                max_bytes,
                "use fewer samples at a time",
            )
            return (
                None,
                None,
                run_native("input_derivatives", call, x, x.new_zeros(()).expand(N, C), 1.0, 0).reshape(out_shape),
            )
    features = jets.check_dims(dims, d)
    stack = native_stack(
        call,
        inputs,
        what + (" with dims" if dims is not None else "") + (" carrying a gradient" if graph else ""),
        model_output=True,
    )
    if graph and stack is None:
        _through_torch_func(call, what)
    if stack is not None:
        _memory.check(
            f"hessext.{what} of {N} samples x {d} features",
            _memory.graph_jet_bytes(call, N, len(features), 0, inputs.element_size()) // (1 if graph else 2),
            inputs,
            max_bytes,
            "use fewer samples at a time",
        )
        x, out_shape, C = stack
        jet = stack_jet(call, x, C, 0, features, graph)
        k = len(features)
        lap = jet[1 + k].reshape(out_shape)
        if what == "laplacian":  # no views of u and grad u for the caller to drop (nor their graph nodes)
            return None, None, lap
        return jet[0].reshape(out_shape), jet[1 : 1 + k].permute(1, 2, 0).reshape(tuple(out_shape) + (k,)), lap
    per_vector = fallback.HVP_GRAPHS * fallback.graph_bytes(model, None, inputs, None, call.fallback_params())
    _memory.check(
        f"hessext.{what} of {N} samples x {d} features",
        _memory.basis_input_peak(0, per_vector, N, d, inputs),
        inputs,
        max_bytes,
        "use fewer samples at a time",
    )
    with fallback.batch_statistics(model):
        return fallback.jets(model, inputs, call, per_vector, features)
