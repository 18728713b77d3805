"""hessext under torch.compile: each public call is one custom op in the graph (fullgraph works).

While dynamo traces a function that calls hessext, the public functions (`entry`) hand their call to
this module instead of running the plan lookup, the guards and the checks (Python that dynamo
cannot trace: weak references, locks, C calls). The model and loss become a constant handle (an int,
found by `_handle` at trace time); the tensors (inputs, targets, vectors, `params`) are the op's
arguments; names and shapes are trace-time constants. When the graph runs, the op calls the eager
function, so every check, the cached plan and the native/torch.func decision happen then, as in
eager mode, on the model and loss as they are at that call.

The op has no derivative: under torch.compile, results are detached, as eager results are without
create_graph. create_graph=True raises when traced; input derivatives that must carry a gradient
(grad mode, parameters or inputs that require grad) run eagerly in a graph break (fullgraph=True
then refuses, with the reason)."""

import weakref

import torch

_handles = {}  # handle -> (weak reference to the model, loss_fn)


def unwrap(model):
    """The module a torch.compile'd model (an OptimizedModule) wraps; hessext differentiates that
    module's parameters (named as in it) and never re-enters dynamo."""
    if type(model).__name__ != "OptimizedModule":  # first: a module's getattr of a missing name is slow
        return model
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else model


@torch._dynamo.assume_constant_result
def _handle(model, loss_fn):
    """The int standing for (model, loss_fn) in the graph; -1 for a module built inside the compiled
    function (dynamo has not given it its attributes yet, and it will not exist when the graph runs:
    seen as a torch loss without its `reduction`, or a module without its `_parameters`)."""
    if any(isinstance(m, torch.nn.Module) and "_parameters" not in vars(m) for m in (model, loss_fn)) or (
        type(loss_fn).__module__ == "torch.nn.modules.loss" and "reduction" not in vars(loss_fn)
    ):
        return -1
    for h, (ref, fn) in _handles.items():
        if ref() is model and fn is loss_fn:
            return h
    for h in [h for h, (ref, _) in _handles.items() if ref() is None]:
        del _handles[h]
    h = max(_handles, default=-1) + 1
    _handles[h] = (weakref.ref(model), loss_fn)
    return h


def _model(h):
    model = _handles[h][0]()
    if model is None:
        raise RuntimeError("hessext: the model of this compiled hessext call no longer exists")
    return model


def _chosen(model, keys):
    """Names of the parameters a call covers (inputs.check_params's rule), in named_parameters() order."""
    from hessext.inputs import chosen

    names, tensors = zip(*model.named_parameters())
    return [names[j] for j in chosen(names, tensors, keys)]


@torch._dynamo.assume_constant_result
def _layout(h, keys, blocks):
    """((name, shape), ...) per result matrix of `hessian`: one group of every chosen parameter, or
    one per layer (_route.layers) with its chosen parameters."""
    from hessext._route import layers
    from hessext.plan import plan as make_plan

    model = _model(h)
    names = _chosen(model, keys)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if blocks == "full":
        return (tuple((n, shapes[n]) for n in names),)
    p = make_plan(model, _handles[h][1])
    groups = [[p.param_names[j] for j in g if p.param_names[j] in names] for g in layers(p)]
    groups = sorted((g for g in groups if g), key=lambda g: p.param_names.index(g[0]))
    return tuple(tuple((n, shapes[n]) for n in g) for g in groups)


@torch._dynamo.assume_constant_result
def _names(h, keys):
    return tuple(_chosen(_model(h), keys))


@torch._dynamo.assume_constant_result
def _needs_graph(h, grad_enabled, inputs_grad):
    """Whether input derivatives would carry a gradient here (_route.needs_graph's rule)."""
    return grad_enabled and (inputs_grad or any(p.requires_grad for p in _model(h).parameters()))


_LIBRARY = torch.library.Library("hessext", "FRAGMENT")


_DISPATCH = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


def _op(schema):
    """Register fn as the CPU/CUDA-agnostic kernel of hessext::<schema> (torch.library's Library, whose
    dispatch costs about 13 us a call where torch.library.custom_op's Python wrapper cost 80 us);
    returns the op. The kernel runs in the dispatch state of an ordinary eager call: a compiled graph
    calls it below autograd, where the eager call's own autograd (the torch.func fallback, the jets'
    derivatives) would record nothing."""

    def register(fn):
        name = schema.split("(")[0]

        def kernel(*args):
            with torch._C._ForceDispatchKeyGuard(*_DISPATCH):
                out = fn(*args)
            return _own(out, args)

        _LIBRARY.define(schema)
        _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
        return getattr(torch.ops.hessext, name)

    return register


def _own(outs, args):
    """The op's outputs as the fakes promise and a custom op must return them: contiguous, each in
    storage of its own (a result split from one flat tensor, or a tensor the call was given, is
    copied)."""
    seen = {
        t.untyped_storage()._cdata
        for a in args
        for t in (a if isinstance(a, (list, tuple)) else (a,))
        if isinstance(t, torch.Tensor)
    }
    owned = []
    for t in outs:
        t = t.contiguous()
        if t.untyped_storage()._cdata in seen:
            t = t.clone()
        seen.add(t.untyped_storage()._cdata)
        owned.append(t)
    return owned


def _fake(name):
    return torch.library.register_fake(f"hessext::{name}", lib=_LIBRARY)


def _split(keys):
    """The op's names argument (names joined by newlines, or None) as a tuple."""
    return None if keys is None else tuple(keys.split("\n"))


def _params(h, params, names):
    if params is None:
        return []
    return [params[n].detach() for n in names]


def _as_dict(names, params):
    return None if not params else dict(zip(names, params))


@_op(
    "call_products(int h, str kind, str backend, Tensor inputs, Tensor targets, Tensor[] vectors, bool flat, "
    "Tensor[] params, str? keys) -> Tensor[]"
)
def _products_op(h, kind, backend, inputs, targets, vectors, flat, params, keys):
    from hessext import curvature

    names = keys.split("\n") if keys is not None else None
    fn = curvature.hvp if kind == "hvp" else curvature.ggn_vp
    out = fn(
        _model(h),
        _handles[h][1],
        inputs,
        targets,
        vectors[0] if flat else list(vectors),
        params=_as_dict(names, params),
        backend=backend,
    )
    return [out] if flat else list(out)


@_fake("call_products")
def _(h, kind, backend, inputs, targets, vectors, flat, params, keys):
    return [torch.empty_like(v) for v in vectors]


@_op(
    "call_diag(int h, bool ggn, str backend, Tensor inputs, Tensor targets, bool per_sample, Tensor[] params, "
    "str? keys) -> Tensor[]"
)
def _diag_op(h, ggn, backend, inputs, targets, per_sample, params, keys):
    from hessext import curvature

    names = keys.split("\n") if keys is not None else None
    fn = curvature.ggn_diag if ggn else curvature.hessian_diag
    out = fn(
        _model(h),
        _handles[h][1],
        inputs,
        targets,
        params=_as_dict(names, params),
        backend=backend,
        per_sample=per_sample,
    )
    return list(out.values())


@_fake("call_diag")
def _(h, ggn, backend, inputs, targets, per_sample, params, keys):
    model = _model(h)
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    lead = (inputs.numel() // first.in_features,) if per_sample else ()
    return [inputs.new_empty(lead + tuple(shapes[n])) for n in _chosen(model, _split(keys))]


@_op(
    "call_hessian(int h, str backend, Tensor inputs, Tensor targets, str blocks, int? max_bytes, Tensor[] params, "
    "str? keys) -> Tensor[]"
)
def _hessian_op(h, backend, inputs, targets, blocks, max_bytes, params, keys):
    from hessext import hessians

    names = keys.split("\n") if keys is not None else None
    out = hessians.hessian(
        _model(h),
        _handles[h][1],
        inputs,
        targets,
        params=_as_dict(names, params),
        backend=backend,
        output="matrix",
        blocks=blocks,
        max_bytes=max_bytes,
    )
    return [out] if blocks == "full" else list(out)


@_fake("call_hessian")
def _(h, backend, inputs, targets, blocks, max_bytes, params, keys):
    sizes = [sum(torch.Size(s).numel() for _, s in g) for g in _layout(h, _split(keys), blocks)]
    return [inputs.new_empty(n, n) for n in sizes]


@_op(
    "call_input_derivatives(int h, str what, str backend, Tensor inputs, Tensor? targets, int[]? dims, "
    "int? max_bytes, Tensor[] params, str? keys) -> Tensor[]"
)
def _input_op(h, what, backend, inputs, targets, dims, max_bytes, params, keys):
    names = keys.split("\n") if keys is not None else None
    out = _input_call(
        what, _model(h), _handles[h][1], inputs, targets, dims, _as_dict(names, params), backend, max_bytes
    )
    return list(out) if isinstance(out, tuple) else [out]


@_fake("call_input_derivatives")
def _(h, what, backend, inputs, targets, dims, max_bytes, params, keys):
    N, d = inputs.shape[0], inputs[0].numel()
    if what == "diagonal":
        return [inputs.new_empty(N, d)]
    if what == "full":
        return [inputs.new_empty(N, d, d)]
    model = _model(h)
    state = {
        n: torch.empty(t.shape, dtype=t.dtype, device=inputs.device)
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
    }
    out = torch.empty_like(torch.func.functional_call(model, state, (inputs,)))
    if what == "laplacian":
        return [out]
    k = d if dims is None else len(dims)
    return [out, out.new_empty(tuple(out.shape) + (k,)), torch.empty_like(out)]


def _input_call(what, model, loss_fn, inputs, targets, dims, params, backend, max_bytes):
    """The eager call behind the op (or behind a graph break)."""
    from hessext import hessians

    if what == "laplacian":
        return hessians.laplacian(model, inputs, dims=dims, params=params, backend=backend, max_bytes=max_bytes)
    if what == "value_gradient_laplacian":
        return hessians.value_gradient_laplacian(
            model, inputs, dims=dims, params=params, backend=backend, max_bytes=max_bytes
        )
    return hessians.input_hessian(
        model,
        loss_fn,
        inputs,
        targets,
        diagonal=what == "diagonal",
        params=params,
        backend=backend,
        max_bytes=max_bytes,
    )


_eager = torch.compiler.disable(
    lambda fn, *args, **kwargs: fn(*args, **kwargs),
    reason="hessext: a model or loss module built inside the compiled function has no "
    "identity the graph can keep; the call runs eagerly (build it outside)",
)


def _no_graph(create_graph):
    if create_graph:
        raise ValueError(
            "hessext under torch.compile computes detached results (its op has no derivative): "
            "create_graph=True needs eager mode"
        )


def _keys(params):
    return None if params is None else tuple(params)


def products(kind, model, loss_fn, inputs, targets, vectors, *, params=None, backend="auto", create_graph=False):
    _no_graph(create_graph)
    h = _handle(model, loss_fn)
    if h < 0:
        from hessext import curvature

        return _eager(
            getattr(curvature, kind), model, loss_fn, inputs, targets, vectors, params=params, backend=backend
        )
    keys = _keys(params)
    names = _names(h, keys)
    flat = isinstance(vectors, torch.Tensor)
    items = [vectors] if flat else ([vectors[n] for n in names] if isinstance(vectors, dict) else list(vectors))
    items = [t.detach() for t in items]  # detached results, as in eager mode without create_graph
    out = _products_op(
        h,
        kind,
        backend,
        inputs.detach(),
        targets.detach(),
        items,
        flat,
        _params(h, params, names),
        None if keys is None else "\n".join(names),
    )
    if flat:
        return out[0]
    if isinstance(vectors, dict):
        return dict(zip(names, out))
    return type(vectors)(out) if isinstance(vectors, tuple) else list(out)


def diag(ggn, model, loss_fn, inputs, targets, *, params=None, backend="auto", per_sample=False, create_graph=False):
    _no_graph(create_graph)
    h = _handle(model, loss_fn)
    if h < 0:
        from hessext import curvature

        fn = curvature.ggn_diag if ggn else curvature.hessian_diag
        return _eager(fn, model, loss_fn, inputs, targets, params=params, backend=backend, per_sample=per_sample)
    keys = _keys(params)
    names = _names(h, keys)
    out = _diag_op(
        h,
        ggn,
        backend,
        inputs.detach(),
        targets.detach(),
        per_sample,
        _params(h, params, names),
        None if keys is None else "\n".join(names),
    )
    return dict(zip(names, out))


def hessian(
    model,
    loss_fn,
    inputs,
    targets,
    *,
    params=None,
    backend="auto",
    output="dict",
    blocks="full",
    max_bytes=None,
    create_graph=False,
):
    _no_graph(create_graph)
    if output not in ("dict", "matrix") or blocks not in ("full", "layer"):
        raise ValueError(f"output must be 'dict' or 'matrix' and blocks 'full' or 'layer', got {output!r}, {blocks!r}")
    h = _handle(model, loss_fn)
    if h < 0:
        from hessext import hessians

        return _eager(
            hessians.hessian,
            model,
            loss_fn,
            inputs,
            targets,
            params=params,
            backend=backend,
            output=output,
            blocks=blocks,
            max_bytes=max_bytes,
        )
    keys = _keys(params)
    names = _names(h, keys)
    mats = _hessian_op(
        h,
        backend,
        inputs.detach(),
        targets.detach(),
        blocks,
        max_bytes,
        _params(h, params, names),
        None if keys is None else "\n".join(names),
    )
    if output == "matrix":
        return mats[0] if blocks == "full" else mats
    result = {}
    for m, group in zip(mats, _layout(h, keys, blocks)):
        sizes = [torch.Size(s).numel() for _, s in group]
        starts = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        for a, (na, sa) in enumerate(group):
            row = result.setdefault(na, {})
            for b, (nb, sb) in enumerate(group):
                row[nb] = m[starts[a] : starts[a + 1], starts[b] : starts[b + 1]].reshape(tuple(sa) + tuple(sb))
    return result


_GRAPH_REASON = (
    "hessext: input derivatives in grad mode, with parameters or inputs that require grad, carry a "
    "gradient, which hessext's op under torch.compile cannot; they run eagerly here (a graph break), "
    "or call them under torch.no_grad() in the compiled function"
)


_eager_with_gradient = torch.compiler.disable(_input_call, reason=_GRAPH_REASON)


def input_derivatives(what, model, loss_fn, inputs, targets, *, dims=None, params=None, backend="auto", max_bytes=None):
    h = _handle(model, loss_fn)
    if h < 0 or _needs_graph(h, torch.is_grad_enabled(), inputs.requires_grad):
        return _eager_with_gradient(what, model, loss_fn, inputs, targets, dims, params, backend, max_bytes)
    keys = _keys(params)
    names = _names(h, keys)
    out = _input_op(
        h,
        what,
        backend,
        inputs,
        targets,
        None if dims is None else list(dims),
        max_bytes,
        _params(h, params, names),
        None if keys is None else "\n".join(names),
    )
    return tuple(out) if what == "value_gradient_laplacian" else out[0]
