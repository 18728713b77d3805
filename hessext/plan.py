"""Decide once per (model, loss) whether the native kernels serve it, and cache the decision.

`plan(model, loss_fn)` returns a Plan: `backend` is "native" or "torch.func" and `reason` says, in
words, what keeps it off the native path (None when native)."""
import weakref
from typing import Optional

import torch

from hessext import capture, ops

BACKENDS = ("auto", "native", "torch.func")
_CACHE_PER_MODEL = 8
_cache = weakref.WeakKeyDictionary()


class Plan:
    """The captured stack (or the reason there is none) for one model and loss."""

    def __init__(self, model, loss_fn):
        self.model, self.loss_fn = model, loss_fn
        self.param_names = [name for name, _ in model.named_parameters()]
        modules = dict(model.named_modules())
        self._slots = [(modules[name.rpartition(".")[0]], name.rpartition(".")[2]) for name in self.param_names]
        self.stack = self.loss = None
        self._shapes = {}
        try:
            self.stack = capture.capture_model(model)
            self.loss = capture.capture_loss(loss_fn)
            reason = None
        except capture.Unsupported as exc:
            reason = str(exc)
        if reason is None and not ops.available():
            from hessext import _native

            reason = f"the native module is unavailable ({_native.status()['error']})"
        self.reason: Optional[str] = reason
        self.backend = "torch.func" if reason else "native"
        if self.stack is not None:
            index = {name: j for j, name in enumerate(self.param_names)}
            order = [p for layer in self.stack.layers for p in (layer.weight, layer.bias) if p]
            self.stack_order = [index[p] for p in order]   # stack slot -> named_parameters position
            self.weight_pos = [index[layer.weight] for layer in self.stack.layers]
            self.bias_pos = [index[layer.bias] if layer.bias else None for layer in self.stack.layers]
            self.activations = list(self.stack.activations)
            self.in_features = self.model.get_submodule(self.stack.layers[0].name).in_features

    def __repr__(self):
        return f"Plan(backend={self.backend!r}, reason={self.reason!r})"

    def parameters(self):
        """The module's current parameters, in named_parameters() order."""
        return [getattr(module, attr) for module, attr in self._slots]

    def output_shape(self, x_shape):
        """(output shape, C) of the model for an input of x_shape after the pre ops; cached per shape."""
        shape = self._shapes.get(x_shape)
        if shape is None:
            width = self.model.get_submodule(self.stack.layers[-1].name).out_features
            out = self.stack.post(torch.empty(x_shape[:-1] + (width,), device="meta"))
            shape = self._shapes[x_shape] = (tuple(out.shape), width)
        return shape


def plan(model, loss_fn):
    """The cached Plan for `model` and `loss_fn` (captured on first use)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    per_model = _cache.setdefault(model, {})
    key = _loss_key(loss_fn)
    entry = per_model.get(key)
    if entry is None or (not isinstance(key, tuple) and entry.loss_fn is not loss_fn):
        if len(per_model) >= _CACHE_PER_MODEL:
            per_model.pop(next(iter(per_model)))
        entry = per_model[key] = Plan(model, loss_fn)
    return entry


def _loss_key(loss_fn):
    """Cache key of a loss: nn.MSELoss by its reduction (users build a new one per call), else identity."""
    if type(loss_fn) is torch.nn.MSELoss:
        return ("nn.MSELoss", loss_fn.reduction)
    return id(loss_fn)


def resolve(model, loss_fn, backend):
    """The Plan and whether to run natively, for the user's `backend` choice."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    p = plan(model, loss_fn)
    if backend == "native" and p.backend != "native":
        raise ValueError(f"backend='native' is not possible for this model and loss: {p.reason}")
    return p, backend != "torch.func" and p.backend == "native"
