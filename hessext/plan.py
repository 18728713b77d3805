"""Decide per (model, loss) whether the native kernels serve it, cache the decision, and check on
every call that it still describes the model and loss as they are now.

`plan(model, loss_fn)` returns a Plan: `backend` is "native" or "torch.func" and `reason` says, in
words, what keeps it off the native path (None when native). The cache holds each model weakly (a
model passed to hessext is freed like any other) and re-captures when `guard.ModelState` or the
loss key says the model or loss changed; captures run under a lock and patch nothing global."""

import threading
import weakref
from typing import Optional

import torch

from hessext import capture, guard, ops
from hessext.compiled import unwrap

BACKENDS = ("auto", "native", "torch.func")
_CACHE_PER_MODEL = 8
_cache = weakref.WeakKeyDictionary()  # model -> _Entry
_lock = threading.RLock()


class Plan:
    """The captured stack (or the reason there is none) for one model and loss, as they were when
    this plan was made; `plan()` hands out only plans whose capture still matches."""

    def __init__(self, model, loss_fn, state):
        self.param_names = [name for name, _ in model.named_parameters()]
        self._params = state.params
        self.loss_state = None  # the loss module's guard.ModelState, where its key is its identity
        self.stack = self.loss = None
        try:
            self.stack = capture.capture_model(model)
            self.loss = capture.capture_loss(loss_fn)
            capture.check_pair(self.stack, self.loss)
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
            self.stack_order = [index[p] for p in order]  # stack slot -> named_parameters position
            self.stack_slot = sorted(range(len(order)), key=self.stack_order.__getitem__)  # its inverse
            self.weight_pos = [index[layer.weight] for layer in self.stack.layers]
            self.bias_pos = [index[layer.bias] if layer.bias else None for layer in self.stack.layers]
            self._shapes = {}
            self.batch_layouts = {}  # (inputs.shape, targets.shape) -> inputs.native_batch's layout
            self.peaks = {}  # (rows, mode, element size, threads) -> _memory.jet_peak's bytes
        if reason is None:  # the kernels' description: (activations, act_params, loss, loss_param)
            acts = self.stack.activations
            self.spec = (
                [a.kind for a in acts],
                [p for a in acts for p in (a.p0, a.p1)],
                self.loss.kind,
                self.loss.param,
            )
            # the native path's targets (csrc/arguments.h batch_tensor): the parameters' dtype (0), or also
            # class indices (1: cross-entropy), or class indices only (2: NLL)
            self.target_kind = 2 if self.loss.nll else 1 if self.loss.classes else 0

    def ggn_reason(self):
        """Why the GGN of this model and loss is not native, or None: the plan's reason, or the split
        at a final LogSoftmax, where the NLL is linear in the model's output so the GGN there is zero
        (the kernels' split at the logits would differ); torch.func computes it."""
        if self.reason is None and self.stack.log_softmax is not None:
            return (
                "the model ends in LogSoftmax, where the GGN (J^T H_out J at the model's output) is zero; "
                "use CrossEntropyLoss on the logits for the softmax GGN"
            )
        return self.reason

    def __repr__(self):
        return f"Plan(backend={self.backend!r}, reason={self.reason!r})"

    def parameters(self):
        """The module's current parameters, in named_parameters() order (the guard keeps them current)."""
        return self._params

    def output_shape(self, x_shape, C):
        """The model's output shape for an input of x_shape after the pre ops (C outputs per row)."""
        key = (x_shape, C)
        shape = self._shapes.get(key)
        if shape is None:
            out = self.stack.post(torch.empty(x_shape[:-1] + (C,), device="meta"))
            shape = self._shapes[key] = tuple(out.shape)
        return shape


class _Entry:
    """A model's state and its plans by loss key; `hot` = (the last loss object, held weakly, its guard
    or None, its plan) for the losses whose key is their identity and settings (a torch function, a
    torch loss module): the same loss object again skips computing its key. `seen`: the last torch
    loss module not yet hot (weakly), whose guard is built only when it comes back."""

    __slots__ = ("state", "plans", "hot", "seen")

    def __init__(self, state):
        self.state, self.plans, self.hot, self.seen = state, {}, None, None


def plan(model, loss_fn):
    """The Plan for `model` and `loss_fn` as they are now: cached, re-captured when either changed."""
    try:  # a model in the cache passed the checks below; the same loss object again: its plan
        entry = _cache.get(model)
    except TypeError:  # not weakly referable: not a module
        entry = None
    if entry is not None:
        if not entry.state.matches():
            entry = None
        elif (hot := entry.hot) is not None and hot[0].get() is loss_fn and (hot[1] is None or hot[1].matches()):
            return hot[2]
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"model is a TorchScript module ({type(model).__name__}, from torch.jit.script or trace), "
            "whose parameters torch.func cannot substitute; pass the nn.Module it was made from"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if entry is None:  # not cached, changed, or wrapped (torch.compile's OptimizedModule)
        entry = _cache.get(model)
        if entry is not None and not entry.state.matches():
            entry = None
    key, loss_state = guard.loss_key(loss_fn)
    if key is not None and entry is not None:
        found = entry.plans.get(key)
        if found is not None and (found.loss_state is None or found.loss_state.matches()):
            _remember_hot(entry, key, loss_fn, found)
            return found
    with _lock:
        entry = _cache.get(model)
        if entry is None or not entry.state.matches():
            entry = _Entry(guard.ModelState(model))
            if not entry.state.refers_to(model):  # else caching would keep the model alive: plan per call
                _cache[model] = entry
        found = entry.plans.get(key) if key is not None else None
        if found is None or (found.loss_state is not None and not found.loss_state.matches()):
            found = Plan(model, loss_fn, entry.state)
            found.loss_state = loss_state
            if key is not None:  # a loss that reads mutable objects is captured on every call
                if len(entry.plans) >= _CACHE_PER_MODEL and key not in entry.plans:
                    entry.plans.pop(next(iter(entry.plans)))
                entry.plans[key] = found
                _remember_hot(entry, key, loss_fn, found)
        return found


def _remember_hot(entry, key, loss_fn, found):
    """Keep (loss_fn, its guard, plan) as the entry's hot loss where its key is its identity and settings:
    a torch function (identity alone), or a torch loss module (guard.ModelState re-reads its settings,
    buffers and hooks, as its key does)."""
    kind = key[0]
    if kind == "torch function":
        entry.hot = (guard.Ref(loss_fn), None, found)
    elif kind == "torch loss":  # its guard (about 10 us to build) once the same object comes back:
        seen = entry.seen  # a loss module built per call never pays for one
        if seen is not None and seen.get() is loss_fn:
            entry.hot = (seen, guard.ModelState(loss_fn), found)
        else:
            entry.seen = guard.Ref(loss_fn)


def resolve(model, loss_fn, backend):
    """The Plan and whether to run natively, for the user's `backend` choice."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    p = plan(model, loss_fn)
    if backend == "native" and p.backend != "native":
        raise ValueError(f"backend='native' is not possible for this model and loss: {p.reason}")
    return p, backend != "torch.func" and p.backend == "native"
