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


def hvp(model, loss_fn, inputs, targets, vectors, *, params=None, backend="auto"):
    """Hessian-vector products of `loss_fn(model(inputs), targets)` with respect to the parameters.

    vectors: a dict name -> tensor, a list/tuple in `model.named_parameters()` order, or a flat tensor
    [P]; each may carry a leading batch dimension K (entries [K, *p.shape], flat [K, P]) for K
    products at once. The result has the same structure, shapes and dtype.
    params: optional dict name -> tensor used instead of the module's parameters.
    backend: "auto" (native when `hessext.plan(model, loss_fn)` allows, else torch.func),
    "native" (error if not possible) or "torch.func".
    Leaves no .grad and no graph behind."""
    plan, native = resolve(model, loss_fn, backend)
    tensors = check_params(plan, params)
    check_batch(inputs, targets, tensors[0], native)
    vecs, restore = pack_vectors(vectors, plan.param_names, tensors)
    if native:
        x, y, scale = native_batch(plan, inputs, targets)
        weights, biases = _stack_args(plan, tensors)
        with torch.no_grad():  # the kernels compute the derivatives; autograd records nothing
            out = ops.hvp(x, y, weights, biases, plan.activations, scale, [vecs[j] for j in plan.stack_order])
        named = [None] * len(out)
        for slot, j in enumerate(plan.stack_order):
            named[j] = out[slot]
    else:
        params_dict = {n: t.detach() for n, t in zip(plan.param_names, tensors)}
        result = fallback.hvp(model, loss_fn, inputs, targets, params_dict, dict(zip(plan.param_names, vecs)))
        named = [result[n].detach() for n in plan.param_names]
    return restore(named)
