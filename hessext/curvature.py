"""The user-facing second-order quantities. Each call: plan (cached capture) -> argument checks ->
one native op or the torch.func fallback -> results shaped like the user's input."""
import torch

from hessext import fallback, ops
from hessext.inputs import check_batch, check_params, native_batch, pack_vectors
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


def _prepare(model, loss_fn, inputs, targets, params, backend):
    plan, native = resolve(model, loss_fn, backend)
    tensors = check_params(plan, params)
    check_batch(inputs, targets, tensors[0], native)
    return plan, native, tensors


def _native_raw(op, plan, tensors, inputs, targets, *extra):
    """The native op's own output for this batch."""
    x, y, scale = native_batch(plan, inputs, targets)
    weights, biases = _stack_args(plan, tensors)
    with torch.no_grad():  # the kernels compute the derivatives; autograd records nothing
        return op(x, y, weights, biases, plan.activations, scale, *extra)


def _native_call(op, plan, tensors, inputs, targets, *extra):
    """A native op with per-parameter outputs, in named_parameters() order."""
    return _from_stack_order(plan, _native_raw(op, plan, tensors, inputs, targets, *extra))


def _fallback_params(plan, tensors):
    return {n: t.detach() for n, t in zip(plan.param_names, tensors)}


def _products(native_op, fallback_op, model, loss_fn, inputs, targets, vectors, params, backend):
    plan, native, tensors = _prepare(model, loss_fn, inputs, targets, params, backend)
    vecs, restore = pack_vectors(vectors, plan.param_names, tensors)
    if native:
        return restore(_native_call(native_op, plan, tensors, inputs, targets, [vecs[j] for j in plan.stack_order]))
    result = fallback_op(model, loss_fn, inputs, targets, _fallback_params(plan, tensors),
                         dict(zip(plan.param_names, vecs)))
    return restore([result[n].detach() for n in plan.param_names])


def hvp(model, loss_fn, inputs, targets, vectors, *, params=None, backend="auto"):
    """Hessian-vector products of `loss_fn(model(inputs), targets)` with respect to the parameters.

    vectors: a dict name -> tensor, a list/tuple in `model.named_parameters()` order, or a flat tensor
    [P]; each may carry a leading batch dimension K (entries [K, *p.shape], flat [K, P]) for K
    products at once. The result has the same structure, shapes and dtype.
    params: optional dict name -> tensor used instead of the module's parameters.
    backend: "auto" (native when `hessext.plan(model, loss_fn)` allows, else torch.func),
    "native" (error if not possible) or "torch.func".
    Leaves no .grad and no graph behind."""
    return _products(ops.hvp, fallback.hvp, model, loss_fn, inputs, targets, vectors, params, backend)


def ggn_vp(model, loss_fn, inputs, targets, vectors, *, params=None, backend="auto"):
    """Generalised Gauss-Newton-vector products J^T H_out J v (J: the Jacobian of the model output in
    the parameters, H_out: the Hessian of the loss in the output). Formats as in `hvp`."""
    return _products(ops.ggn_vp, fallback.ggn_vp, model, loss_fn, inputs, targets, vectors, params, backend)


def _diag(ggn, model, loss_fn, inputs, targets, params, backend, per_sample):
    plan, native, tensors = _prepare(model, loss_fn, inputs, targets, params, backend)
    if native:
        return dict(zip(plan.param_names, _native_call(ops.diag, plan, tensors, inputs, targets, ggn, per_sample)))
    if per_sample:
        raise ValueError(f"per_sample=True needs the native path (a loss that is a sum over samples); "
                         f"this model and loss take torch.func: {plan.reason}")
    p = _fallback_params(plan, tensors)
    op = fallback.ggn_vp if ggn else fallback.hvp
    out = fallback.basis_diag(lambda v: op(model, loss_fn, inputs, targets, p, v), p,
                              "GGN diagonal" if ggn else "Hessian diagonal")
    return {n: t.detach() for n, t in out.items()}


def hessian_diag(model, loss_fn, inputs, targets, *, params=None, backend="auto", per_sample=False):
    """The exact diagonal of the Hessian of the loss in every parameter, as a dict name -> tensor shaped
    like the parameter, including tanh's second-derivative (residual) terms; not an estimate.
    per_sample=True: a leading dimension M (the rows of the batch), the diagonal of each sample's
    term of the loss (they sum to the full diagonal). Native for Linear/Tanh/MSE stacks; otherwise
    exact through P torch.func HVPs (refused beyond fallback.MAX_BASIS_PRODUCTS parameters)."""
    return _diag(False, model, loss_fn, inputs, targets, params, backend, per_sample)


def ggn_diag(model, loss_fn, inputs, targets, *, params=None, backend="auto", per_sample=False):
    """The exact diagonal of the generalised Gauss-Newton matrix J^T H_out J; as `hessian_diag`."""
    return _diag(True, model, loss_fn, inputs, targets, params, backend, per_sample)


def hutchinson_diag(model, loss_fn, inputs, targets, *, samples=100, generator=None, params=None,
                    backend="auto", batch=64):
    """An unbiased estimate of the Hessian diagonal for any model: the mean of v * (H v) over `samples`
    Rademacher vectors v (entries +1 or -1 with probability 1/2), drawn from `generator` (a CPU
    torch.Generator, for reproducibility) and applied `batch` at a time. Dict name -> tensor."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    plan, _, tensors = _prepare(model, loss_fn, inputs, targets, params, backend)
    ref = tensors[0]
    P = sum(t.numel() for t in tensors)
    total = torch.zeros(P, dtype=ref.dtype, device=ref.device)
    for start in range(0, samples, batch):
        k = min(batch, samples - start)
        v = rademacher((k, P), generator).to(dtype=ref.dtype, device=ref.device)
        total += (v * hvp(model, loss_fn, inputs, targets, v, params=params, backend=backend)).sum(0)
    total /= samples
    sizes = [t.numel() for t in tensors]
    return {n: c.reshape(t.shape) for n, c, t in zip(plan.param_names, total.split(sizes), tensors)}


def rademacher(shape, generator=None):
    """A float tensor of independent +1/-1 entries, each with probability 1/2."""
    return torch.randint(0, 2, shape, generator=generator).mul_(2).sub_(1).to(torch.get_default_dtype())
