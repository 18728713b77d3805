"""Thin wrappers over torch.ops.hessext.*, each with its fake (meta) implementation beside it so the
ops trace under torch.compile. Argument conventions: csrc/hessext.cpp and csrc/stack.h.
The fakes are registered once the native library has loaded (`available()`).

Each wrapper calls its op with autograd off (the ops have no derivative of their own): while
torch.compile traces, through torch.ops under no_grad, so that the graph holds the op; otherwise
through hessext._C's direct entry, the same dispatcher call without torch.ops' parsing of the
arguments (about 2 us of a small call)."""
import torch

from hessext import _native

_is_compiling = torch.compiler.is_compiling


def _call(name, *args):
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


def hvp(inputs, targets, weights, biases, spec, scale, vectors):
    """[K, *p.shape] per parameter (stack order): K Hessian-vector products. spec: the plan's
    (activations, act_params, loss, loss_param)."""
    return _call("hvp", inputs, targets, weights, biases, *spec, scale, vectors)


@_fake("hessext::hvp")
def _hvp_fake(inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, vectors):
    return [torch.empty_like(v) for v in vectors]


def ggn_vp(inputs, targets, weights, biases, spec, scale, vectors):
    """[K, *p.shape] per parameter (stack order): K GGN-vector products."""
    return _call("ggn_vp", inputs, targets, weights, biases, *spec, scale, vectors)


@_fake("hessext::ggn_vp")
def _ggn_vp_fake(inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, vectors):
    return [torch.empty_like(v) for v in vectors]


def diag(inputs, targets, weights, biases, spec, scale, ggn, per_sample):
    """Per parameter (stack order) the exact Hessian/GGN diagonal, [*p.shape] or [M, *p.shape]."""
    return _call("diag", inputs, targets, weights, biases, *spec, scale, ggn, per_sample)


@_fake("hessext::diag")
def _diag_fake(inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, ggn, per_sample):
    lead = (inputs.shape[0],) if per_sample else ()
    shapes = []
    for w, b in zip(weights, biases):
        shapes.append(lead + tuple(w.shape))
        if b is not None:
            shapes.append(lead + tuple(b.shape))
    return [inputs.new_empty(shape) for shape in shapes]


def hessian(inputs, targets, weights, biases, spec, scale, layer_blocks):
    """[H [P, P]] in stack order, or one [P_l, P_l] per layer with layer_blocks."""
    return _call("hessian", inputs, targets, weights, biases, *spec, scale, layer_blocks)


@_fake("hessext::hessian")
def _hessian_fake(inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, layer_blocks):
    sizes = [w.numel() + (b.numel() if b is not None else 0) for w, b in zip(weights, biases)]
    shapes = [(n, n) for n in sizes] if layer_blocks else [(sum(sizes), sum(sizes))]
    return [inputs.new_empty(shape) for shape in shapes]


def input_derivatives(inputs, targets, weights, biases, spec, scale, mode):
    """mode 0: Laplacians [M, C]; 1: input-Hessian diagonals [M, d]; 2: input Hessians [M, d, d]."""
    return _call("input_derivatives", inputs, targets, weights, biases, *spec, scale, mode)


@_fake("hessext::input_derivatives")
def _input_derivatives_fake(inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale, mode):
    M, d = inputs.shape
    shape = {0: (M, weights[-1].shape[0]), 1: (M, d), 2: (M, d, d)}[mode]
    return inputs.new_empty(shape)


_registered = False


def available():
    """Whether the native ops are loaded (loading them, and registering the fakes, on first use)."""
    global _registered
    if _native.load() is None:
        return False
    if not _registered:
        for name, fn in _FAKES.items():
            torch.library.register_fake(name)(fn)
        _registered = True
    return True
