"""Thin wrappers over torch.ops.hessext.*, each with its fake (meta) implementation beside it so the
ops trace under torch.compile. Argument conventions: csrc/hessext.cpp and csrc/stack.h."""
import torch

from hessext import _native

_registered = False


def available():
    """Whether the native ops are loaded (loading them on first use)."""
    global _registered
    if _native.load() is None:
        return False
    if not _registered:
        _register_fakes()
        _registered = True
    return True


def hvp(inputs, targets, weights, biases, activations, scale, vectors):
    """[K, *p.shape] per parameter (stack order): K Hessian-vector products."""
    return torch.ops.hessext.hvp(inputs, targets, weights, biases, activations, scale, vectors)


def ggn_vp(inputs, targets, weights, biases, activations, scale, vectors):
    """[K, *p.shape] per parameter (stack order): K GGN-vector products."""
    return torch.ops.hessext.ggn_vp(inputs, targets, weights, biases, activations, scale, vectors)


def diag(inputs, targets, weights, biases, activations, scale, ggn, per_sample):
    """Per parameter (stack order) the exact Hessian/GGN diagonal, [*p.shape] or [M, *p.shape]."""
    return torch.ops.hessext.diag(inputs, targets, weights, biases, activations, scale, ggn, per_sample)


def _register_fakes():
    @torch.library.register_fake("hessext::hvp")
    def _hvp_fake(inputs, targets, weights, biases, activations, scale, vectors):
        return [torch.empty_like(v) for v in vectors]

    @torch.library.register_fake("hessext::ggn_vp")
    def _ggn_vp_fake(inputs, targets, weights, biases, activations, scale, vectors):
        return [torch.empty_like(v) for v in vectors]

    @torch.library.register_fake("hessext::diag")
    def _diag_fake(inputs, targets, weights, biases, activations, scale, ggn, per_sample):
        lead = (inputs.shape[0],) if per_sample else ()
        shapes = []
        for w, b in zip(weights, biases):
            shapes.append(lead + tuple(w.shape))
            if b is not None:
                shapes.append(lead + tuple(b.shape))
        return [inputs.new_empty(shape) for shape in shapes]
