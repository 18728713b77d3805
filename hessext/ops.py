"""Calls of torch.ops.hessext.*, with each op's fake (meta) implementation so the ops trace under
torch.compile. Argument conventions: csrc/hessext.cpp and csrc/stack.h. The fakes are registered once
the native library has loaded (`available()`).

`call` runs an op with autograd off (the ops have no derivative of their own): while torch.compile
traces, through torch.ops under no_grad, so that the graph holds the op; otherwise through
hessext._C's direct entry, the same dispatcher call without torch.ops' parsing of the arguments
(about 2 us of a small call). The jets' ops have wrappers of their own below (their autograd)."""

import torch

from hessext import _native

_is_compiling = torch.compiler.is_compiling


def call(name, *args):
    """The op hessext::<name> on its schema's arguments (csrc/hessext.cpp)."""
    if _is_compiling():
        with torch.no_grad():
            return getattr(torch.ops.hessext, name)(*args)
    return getattr(_native.load(), name)(*args)


_FAKES = {}


def _fake(name):
    def register(fn):
        _FAKES[name] = fn
        return fn

    return register


# hessext::hvp: [K, *p.shape] per parameter (stack order): K Hessian-vector products. spec: the plan's
# (activations, act_params, loss, loss_param).
@_fake("hessext::hvp")
def _hvp_fake(inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, vectors):
    return [torch.empty_like(v) for v in vectors]


# hessext::ggn_vp: [K, *p.shape] per parameter (stack order): K GGN-vector products.
@_fake("hessext::ggn_vp")
def _ggn_vp_fake(inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, vectors):
    return [torch.empty_like(v) for v in vectors]


# hessext::diag: per parameter (stack order) the exact Hessian/GGN diagonal, [*p.shape] or [M, *p.shape].
@_fake("hessext::diag")
def _diag_fake(inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, ggn, per_sample):
    lead = (inputs.shape[0],) if per_sample else ()
    shapes = []
    for w, b in zip(weights, biases):
        shapes.append(lead + tuple(w.shape))
        if b is not None:
            shapes.append(lead + tuple(b.shape))
    return [inputs.new_empty(shape) for shape in shapes]


# hessext::hessian: [H [P, P]] in stack order, or one [P_l, P_l] per layer with layer_blocks.
@_fake("hessext::hessian")
def _hessian_fake(inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, layer_blocks):
    sizes = [w.numel() + (b.numel() if b is not None else 0) for w, b in zip(weights, biases)]
    shapes = [(n, n) for n in sizes] if layer_blocks else [(sum(sizes), sum(sizes))]
    return [inputs.new_empty(shape) for shape in shapes]


# hessext::input_derivatives: mode 0: Laplacians [M, C]; 1: input-Hessian diagonals [M, d]; 2: input Hessians
# [M, d, d].
@_fake("hessext::input_derivatives")
def _input_derivatives_fake(inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, mode):
    M, d = inputs.shape
    shape = {0: (M, weights[-1].shape[0]), 1: (M, d), 2: (M, d, d)}[mode]
    return inputs.new_empty(shape)


def jet_channels(mode, k):
    """The second-order channels of a jet mode over k features (csrc/jets.h jet_channels)."""
    return {0: 1, 1: k, 2: k * (k + 1) // 2}[mode]


def output_jets(inputs, targets, weights, biases, spec, scale, mode, features, graph):
    """The output jet [1 + k + q, M, C]: the output u, its derivatives in the k input features
    `features`, then q second-order channels (mode 0: the Laplacian over them; 1: each d^2/dx_i^2; 2: each
    d^2/dx_i dx_j, i <= j). graph: differentiable, its autograd formula the reverse pass
    (output_jets_backward), with the jets it needs saved; else no autograd, nothing saved."""
    if not graph:
        return call("output_jets", inputs, targets, weights, biases, *spec, scale, mode, features, False)[0]
    if _is_compiling():  # autograd takes a list of tensors only: an absent bias enters as zeros (the same jets)
        biases = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
        return torch.ops.hessext.output_jets(inputs, targets, weights, biases, *spec, scale, mode, features, True)[0]
    return OutputJets.apply(
        (targets, tuple(spec), scale, mode, tuple(features), len(weights)), inputs, *weights, *biases
    )


@_fake("hessext::output_jets")
def _output_jets_fake(
    inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, mode, features, save
):
    cols, M = 1 + len(features) + jet_channels(mode, len(features)), inputs.shape[0]
    out = [inputs.new_empty(cols, M, weights[-1].shape[0])]
    if save:
        for w in weights[:-1]:
            out += [inputs.new_empty(cols, M, w.shape[0]), inputs.new_empty(cols, M, w.shape[0])]
    return out


@_fake("hessext::output_jets_backward")
def _output_jets_backward_fake(
    inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, mode, features, saved, grad
):
    return (
        [torch.empty_like(inputs)]
        + [torch.empty_like(w) for w in weights]
        + [torch.empty_like(b) for b in biases if b is not None]
    )


def output_jets_tangent(inputs, targets, weights, biases, spec, features, saved, dW, db):
    """The tangent [k + 2, M, K, C] of the Laplacian's output jet along K weight directions dW [K, *W.shape]
    and db [K, o] (None: none in that bias), from output_jets' saved jets (no autograd)."""
    return call("output_jets_tangent", inputs, targets, weights, biases, *spec, 1.0, features, saved, dW, db)


@_fake("hessext::output_jets_tangent")
def _output_jets_tangent_fake(
    inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, features, saved, dW, db
):
    return inputs.new_empty(len(features) + 2, inputs.shape[0], dW[0].shape[0], weights[-1].shape[0])


def output_jets_vjp(inputs, targets, weights, biases, spec, features, saved, grad):
    """[dW_l [K, *W.shape] per layer, then db_l [K, o] per layer with a bias]: the transpose of
    output_jets_tangent for K gradients grad [k + 2, M, K, C] in the Laplacian's output jet."""
    return call("output_jets_vjp", inputs, targets, weights, biases, *spec, 1.0, features, saved, grad)


@_fake("hessext::output_jets_vjp")
def _output_jets_vjp_fake(
    inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, features, saved, grad
):
    K = grad.shape[2]
    return [inputs.new_empty((K,) + tuple(w.shape)) for w in weights] + [
        inputs.new_empty(K, b.shape[0]) for b in biases if b is not None
    ]


def _jets_reverse(args, x, targets, weights, biases, saved, grad):
    """[dx, dW_0, ..., dW_{L-1}, db_0, ..., db_{L-1}] (None for an absent bias) for the gradient `grad`
    in the output jet: the reverse pass in the kernels; under create_graph (a second derivative through
    the jets), the same reverse by autograd through the forward jets in torch ops (hessext/jets.py), so
    that it is differentiable in turn."""
    activations, act_params, loss, loss_param, scale, mode, features = args
    L = len(weights)
    if grad is None:
        grad = x.new_zeros(1 + len(features) + jet_channels(mode, len(features)), x.shape[0], weights[-1].shape[0])
    if torch.is_grad_enabled():
        from hessext import jets

        tensors = [x] + list(weights) + list(biases)
        wanted = [t for t in tensors if t is not None and t.requires_grad]
        jet = jets.output_jet(jets.torch_functions(activations, act_params), weights, biases, x, features, mode)
        got = iter(torch.autograd.grad(jet, wanted, grad, create_graph=True, allow_unused=True))
        return [next(got) if t is not None and t.requires_grad else None for t in tensors]
    found = call(
        "output_jets_backward",
        x,
        targets,
        weights,
        biases,
        activations,
        act_params,
        loss,
        loss_param,
        scale,
        mode,
        features,
        saved,
        grad,
    )
    db = iter(found[1 + L :])
    return found[: 1 + L] + [next(db) if b is not None else None for b in biases]


class OutputJets(torch.autograd.Function):
    """The op output_jets (with save) as an autograd function, for eager calls: the kernels' direct entry
    forward and back, without torch.ops' argument parsing (about 0.25 ms a call each way on
    [2,50,50,50,1], N=1024). torch.compile traces the op itself, whose registered formula is the same
    `_jets_reverse`."""

    @staticmethod
    def forward(ctx, args, x, *params):
        targets, spec, scale, mode, features, L = args
        weights, biases = list(params[:L]), list(params[L:])
        out = _native.load().output_jets(x, targets, weights, biases, *spec, scale, mode, list(features), True)
        ctx.args = (*spec, scale, mode, list(features))
        ctx.layers = L
        ctx.biased = [b is not None for b in biases]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, targets, *weights, *[b for b in biases if b is not None], *out[1:])
        return out[0]

    @staticmethod
    def backward(ctx, grad):
        L = ctx.layers
        x, targets, *rest = ctx.saved_tensors
        weights, rest = rest[:L], rest[L:]
        kept = iter(rest[: sum(ctx.biased)])
        biases = [next(kept) if has else None for has in ctx.biased]
        found = _jets_reverse(ctx.args, x, targets, weights, biases, rest[sum(ctx.biased) :], grad)
        return (None, *found)


def _jets_setup(ctx, inputs, output):
    x, targets, weights, biases, activations, act_params, loss, loss_param, scale, mode, features, _ = inputs
    ctx.args = (activations, act_params, loss, loss_param, scale, mode, features)
    ctx.layers = len(weights)
    ctx.set_materialize_grads(False)  # the saved jets never get a gradient: no zeros for them
    ctx.save_for_backward(x, targets, *weights, *biases, *output[1:])


def _jets_backward(ctx, grads):
    """The registered autograd formula of hessext::output_jets (biases all present: zeros for absent ones)."""
    L = ctx.layers
    x, targets, *rest = ctx.saved_tensors
    found = _jets_reverse(ctx.args, x, targets, rest[:L], rest[L : 2 * L], rest[2 * L :], grads[0])
    return found[0], None, found[1 : 1 + L], found[1 + L :], None, None, None, None, None, None, None, None


_registered = False


def available():
    """Whether the native ops are loaded (loading them, and registering the fakes, on first use)."""
    global _registered
    if _native.load() is None:
        return False
    if not _registered:
        for name, fn in _FAKES.items():
            torch.library.register_fake(name)(fn)
        torch.library.register_autograd("hessext::output_jets", _jets_backward, setup_context=_jets_setup)
        _registered = True
    return True
