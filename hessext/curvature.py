"""The user-facing second-order quantities. Each call: plan (cached capture) -> argument checks ->
one native op or the torch.func fallback -> results shaped like the user's input."""

from __future__ import annotations

import torch
import torch.nn as nn

from hessext import compiled, fallback, ops
from hessext._types import LossFn, Params, Tensor, Vectors
from hessext.compiled import unwrap
from hessext.inputs import (
    capturing,
    check_batch,
    check_params,
    class_layout,
    finite,
    native_batch,
    pack_vectors,
    transformed,
)
from hessext.plan import resolve


def _stack_args(plan, tensors):
    weights = [tensors[j] for j in plan.weight_pos]
    biases = [tensors[j] if j is not None else None for j in plan.bias_pos]
    return weights, biases


def _from_stack_order(plan, out):
    """Per-parameter results in stack order -> named_parameters() order."""
    named = [None] * len(out)
    for slot, j in enumerate(plan.stack_order):
        named[j] = out[slot]
    return named


class Call:
    """One call's route: the plan, the parameter tensors (all of the model's, in named_parameters()
    order) and the positions `sel` of those the quantities are taken in (inputs.check_params), whether
    the kernels serve it, and whether torch.func transforms the arguments (then the fallback runs
    without detaching, so that the result can be differentiated or batched further)."""

    __slots__ = ("plan", "tensors", "sel", "partial", "native", "traced", "backend", "why")

    def __init__(self, plan, tensors, sel, native, backend):
        self.plan, self.tensors, self.sel, self.native, self.backend = plan, tensors, sel, native, backend
        self.partial = len(sel) < len(tensors)  # some parameters left out (frozen, or not named in `params`)
        self.traced = False
        self.why = plan.reason  # why this call is not native (None while it is)

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


def route(model, loss_fn, inputs, targets, params, backend, *, targets_needed=True, create_graph=False):
    """Plan, argument checks and the native/fallback decision for one call. The native path is
    taken only for finite inputs and targets (torch's NaN/inf propagation is the fallback's; not
    checked under CUDA-graph capture, which forbids reading values back), for cross-entropy only with
    the classes in the last dim of a [N, C] output, never under a torch.func transform and never
    with create_graph=True (the kernels have no derivative of their own); backend='native' raises
    wherever the call leaves the kernels."""
    check_create_graph(create_graph)
    plan, native = resolve(model, loss_fn, backend)
    tensors, sel = check_params(plan, params)
    check_batch(inputs, targets, tensors[0], plan.loss if native else None, targets_needed)
    batch = (inputs, targets) if targets_needed else (inputs,)
    call = Call(plan, tensors, sel, native, backend)
    call.check_traced(batch + tuple(tensors))
    if create_graph and not call.traced:
        call.keep_graph(
            "create_graph=True differentiates through the result, which the kernels cannot "
            "(torch.func computes it; use backend='auto')"
        )
    if call.native and plan.loss.classes and not class_layout(plan, inputs):
        call.leave_native(
            "cross-entropy reads the classes from dim 1 of this output; the kernels need them "
            "in the last dim of an [N, C] output"
        )
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
        call.leave_native("inputs or targets hold NaN or inf, whose propagation torch.func reproduces exactly")
    return call


def run_native(op, call, x, y, scale, *extra):
    """The native op on kernel-layout rows x [M, n_0], y [M, C] with the loss scale."""
    weights, biases = _stack_args(call.plan, call.tensors)
    return op(x, y, weights, biases, call.plan.spec, scale, *extra)


def _native_raw(op, call, inputs, targets, *extra):
    """The native op's own output for this batch."""
    return run_native(op, call, *native_batch(call.plan, inputs, targets, call.tensors), *extra)


def _native_call(op, call, inputs, targets, *extra):
    """A native op with per-parameter outputs, for the selected parameters in named_parameters() order."""
    out = _from_stack_order(call.plan, _native_raw(op, call, inputs, targets, *extra))
    return [out[j] for j in call.sel] if call.partial else out


def _products(native_op, fallback_op, model, loss_fn, inputs, targets, vectors, params, backend, create_graph):
    call = route(model, loss_fn, inputs, targets, params, backend, create_graph=create_graph)
    plan = call.plan
    if native_op is ops.ggn_vp:
        call.ggn_split()
    names = call.names
    vecs, batched, restore = pack_vectors(vectors, names, call.selected)
    call.check_traced(vecs)
    if call.native:
        full = vecs
        if call.partial:  # the kernels take every parameter: zeros along the left-out ones
            lead = tuple(vecs[0].shape[:1]) if batched else ()
            full = [t.new_zeros(lead + t.shape) for t in call.tensors]
            for v, j in zip(vecs, call.sel):
                full[j] = v
        return restore(_native_call(native_op, call, inputs, targets, [full[j] for j in plan.stack_order]))
    vecs = vecs if batched else [v.unsqueeze(0) for v in vecs]  # the fallback takes [K, *shape]
    vecs = dict(zip(names, vecs if call.traced else [v.detach() for v in vecs]))
    with fallback.batch_statistics(model):
        result = fallback_op(model, loss_fn, inputs, targets, call.fallback_params(), vecs, keep_graph=call.traced)
    return restore([call.result(result[n] if batched else result[n][0]) for n in names])


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    vectors: Vectors,
    *,
    params: Params = None,
    backend: str = "auto",
    create_graph: bool = False,
) -> Vectors:
    """Hessian-vector products of ``loss_fn(model(inputs), targets)`` in the parameters.

    Args:
        model: an ``nn.Module``; Linear/activation stacks run in the native kernels, any other
            model through torch.func (``hessext.plan(model, loss_fn).reason`` says why).
        loss_fn: a torch loss module or function of ``(output, targets)``.
        inputs: the batch, ``[N, ...]``.
        targets: the targets, as ``loss_fn`` takes them.
        vectors: a dict name -> tensor, a list or tuple in ``model.named_parameters()`` order, or a
            flat tensor ``[P]``; each may carry a leading batch dimension K (entries
            ``[K, *p.shape]``, flat ``[K, P]``) for K products at once.
        params: optional dict name -> tensor used instead of the module's parameters (a subset
            restricts the products to those parameters).
        backend: ``"auto"`` (native when the plan allows, else torch.func), ``"native"`` (a
            ``ValueError`` where not possible) or ``"torch.func"``.
        create_graph: as in ``torch.autograd.grad``: False returns detached results and leaves no
            ``.grad`` and no graph behind; True returns results differentiable in the parameters,
            inputs, targets and vectors (computed by torch.func).

    Returns:
        H v in the structure, shapes and dtype of ``vectors``.

    Raises:
        ValueError, TypeError: bad arguments, named, before any kernel runs.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        >>> v = [torch.randn_like(p) for p in model.parameters()]
        >>> Hv = hessext.hvp(model, nn.MSELoss(), x, y, v)
        >>> [tuple(t.shape) for t in Hv]
        [(8, 3), (8,), (1, 8), (1,)]
    """
    if torch.compiler.is_compiling():
        return compiled.products(
            "hvp",
            unwrap(model),
            loss_fn,
            inputs,
            targets,
            vectors,
            params=params,
            backend=backend,
            create_graph=create_graph,
        )
    return _products(
        ops.hvp, fallback.hvp, unwrap(model), loss_fn, inputs, targets, vectors, params, backend, create_graph
    )


def ggn_vp(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    vectors: Vectors,
    *,
    params: Params = None,
    backend: str = "auto",
    create_graph: bool = False,
) -> Vectors:
    """Generalised Gauss-Newton-vector products ``J^T H_out J v``.

    J is the Jacobian of the model output in the parameters and H_out the Hessian of the loss in
    the output. Arguments and result as in :func:`hessext.hvp`.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
        >>> P = sum(p.numel() for p in model.parameters())
        >>> hessext.ggn_vp(model, nn.MSELoss(), x, y, torch.ones(4, P, dtype=torch.float64)).shape
        torch.Size([4, 50])
    """
    if torch.compiler.is_compiling():
        return compiled.products(
            "ggn_vp",
            unwrap(model),
            loss_fn,
            inputs,
            targets,
            vectors,
            params=params,
            backend=backend,
            create_graph=create_graph,
        )
    return _products(
        ops.ggn_vp, fallback.ggn_vp, unwrap(model), loss_fn, inputs, targets, vectors, params, backend, create_graph
    )


def _diag(ggn, model, loss_fn, inputs, targets, params, backend, per_sample, create_graph):
    model = unwrap(model)
    if torch.compiler.is_compiling():
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
        return dict(zip(call.names, _native_call(ops.diag, call, inputs, targets, ggn, per_sample)))
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


def hessian_diag(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Params = None,
    backend: str = "auto",
    per_sample: bool = False,
    create_graph: bool = False,
) -> dict[str, Tensor]:
    """The exact diagonal of the Hessian of the loss in every parameter (not an estimate).

    It includes the activations' second-derivative (residual) terms. Native for the stacks the
    kernels serve; otherwise exact through P torch.func HVPs (refused beyond
    ``fallback.MAX_BASIS_PRODUCTS`` parameters).

    Args:
        model, loss_fn, inputs, targets, params, backend: as in :func:`hessext.hvp`.
        per_sample: True adds a leading dimension M (the rows of the batch): the diagonal of each
            sample's term of the loss (they sum to the full diagonal).
        create_graph: as in :func:`hessext.hvp` (True: differentiable, through torch.func).

    Returns:
        dict name -> tensor shaped like the parameter (``[M, *p.shape]`` with ``per_sample``).

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        >>> {k: tuple(v.shape) for k, v in hessext.hessian_diag(model, nn.MSELoss(), x, y).items()}
        {'0.weight': (8, 3), '0.bias': (8,), '2.weight': (1, 8), '2.bias': (1,)}
    """
    return _diag(False, model, loss_fn, inputs, targets, params, backend, per_sample, create_graph)


def ggn_diag(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Params = None,
    backend: str = "auto",
    per_sample: bool = False,
    create_graph: bool = False,
) -> dict[str, Tensor]:
    """The exact diagonal of the generalised Gauss-Newton matrix ``J^T H_out J``.

    Arguments and result as in :func:`hessext.hessian_diag`.
    """
    return _diag(True, model, loss_fn, inputs, targets, params, backend, per_sample, create_graph)


def hutchinson_diag(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    samples: int = 100,
    generator: torch.Generator | None = None,
    params: Params = None,
    backend: str = "auto",
    batch: int = 64,
) -> dict[str, Tensor]:
    """An unbiased estimate of the Hessian diagonal, for any model.

    The mean of ``v * (H v)`` over Rademacher vectors v (entries +1 or -1 with probability 1/2).

    Args:
        model, loss_fn, inputs, targets, params, backend: as in :func:`hessext.hvp`.
        samples: the number of vectors v.
        generator: a CPU ``torch.Generator`` for the vectors, for reproducibility.
        batch: vectors applied at once.

    Returns:
        dict name -> tensor shaped like the parameter.
    """
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int (vectors per product call), got {batch!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    model = unwrap(model)
    call = route(model, loss_fn, inputs, targets, params, backend)
    names, tensors = call.names, call.selected
    ref = tensors[0]
    P = sum(t.numel() for t in tensors)
    total = torch.zeros(P, dtype=ref.dtype, device=ref.device)
    for start in range(0, samples, batch):
        k = min(batch, samples - start)
        v = rademacher((k, P), generator).to(dtype=ref.dtype, device=ref.device)
        total += (v * hvp(model, loss_fn, inputs, targets, v, params=params, backend=backend)).sum(0)
    total /= samples
    sizes = [t.numel() for t in tensors]
    return {n: c.reshape(t.shape) for n, c, t in zip(names, total.split(sizes), tensors)}


def rademacher(shape, generator=None):
    """A float tensor of independent +1/-1 entries, each with probability 1/2."""
    return torch.randint(0, 2, shape, generator=generator).mul_(2).sub_(1).to(torch.get_default_dtype())
