"""What a capture read, checked again on every call, so that a cached plan never outlives the model
or loss it describes.

A model's state is a flat list of objects compared by identity or equality: for every module of the tree, its
type and its class's `forward`, its attribute names and values (`training`, custom flags, an
instance `forward`, the `_parameters`/`_modules`/`_buffers` dicts) and their entries, whether it has
hooks; the dtype of every parameter; whether global module hooks exist; and the values of the
globals that a user-defined `forward` names. Any reassignment, swapped or appended layer, removed
bias, tied weight, train/eval switch, hook or patched `forward` changes it.

A loss is keyed by what determines its behaviour (`loss_key`); one that reads objects which can
change in place (a dict, a list, an arbitrary callable object) is captured afresh on every call.
Objects in keys are held weakly where they can be."""

import functools
import types
import weakref

import torch

from torch.nn.modules import module as _torch_module

from hessext import _native
from hessext.capture import HOOK_DICTS

_PRIMITIVES = (int, float, bool, str, bytes, complex, type(None))
_GLOBAL_HOOKS = [
    getattr(_torch_module, f"_global_{k}_hooks") for k in ("forward", "forward_pre", "backward", "backward_pre")
]
_MISSING = object()


def _is_user_code(obj):
    return not (getattr(obj, "__module__", None) or "torch.").startswith("torch.")


def _user_forward_globals(modules):
    """(globals dict, names) for each forward defined outside torch whose globals it may read, and for
    the user functions those globals name (helpers a forward calls), three calls deep."""
    found, seen = [], set()

    def add(fn, depth):
        code = getattr(fn, "__code__", None)
        if code is None or id(code) in seen or not _is_user_code(fn):
            return
        seen.add(id(code))
        g = fn.__globals__
        found.append((g, code.co_names))
        if depth < 3:
            for n in code.co_names:
                if isinstance(g.get(n), types.FunctionType):
                    add(g[n], depth + 1)

    for m in modules:
        if _is_user_code(type(m)):
            add(type(m).forward, 0)
    return found


_PLAIN = (
    torch.nn.Module,
    torch.Tensor,
    type,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    types.ModuleType,
    staticmethod,
    classmethod,
    property,
)


def _contents(obj, depth=0):
    """What a forward could read from obj, as a value that compares equal while obj's contents are
    unchanged: containers and plain objects by their items (a dict mutated in place keeps its
    identity), tensors by identity and version, everything else by identity."""
    t = type(obj)
    if t in _PRIMITIVES:
        return obj
    if isinstance(obj, torch.Tensor):
        return ("tensor", id(obj), obj._version)
    if depth < 4:
        if isinstance(obj, (list, tuple)):
            return (t, tuple(_contents(v, depth + 1) for v in obj))
        if isinstance(obj, dict):
            return (t, tuple((k, _contents(v, depth + 1)) for k, v in obj.items()))
        if isinstance(obj, (set, frozenset)):
            return (t, frozenset(_contents(v, depth + 1) for v in obj))
        if not isinstance(obj, _PLAIN) and isinstance(getattr(obj, "__dict__", None), dict):
            return (t, _contents(obj.__dict__, depth + 1))
    return ("id", id(obj))


def _watched(modules, fwd_globals):
    """Objects whose contents a capture may have read and whose changes keep their identity: the
    containers and plain objects among the modules' attributes and the forwards' globals, and the
    data attributes of the user's module classes (a class attribute changed after the capture)."""
    watch = []
    for m in modules:
        for k, v in m.__dict__.items():
            if not k.startswith("_") and type(v) not in _PRIMITIVES and not isinstance(v, _PLAIN):
                watch.append(v)
        for cls in type(m).__mro__:
            if _is_user_code(cls) and cls is not object:
                names = tuple(k for k, v in vars(cls).items() if not k.startswith("__") and not isinstance(v, _PLAIN))
                if names:
                    watch.append(_ClassData(cls, names))
    for g, names in fwd_globals:
        for n in names:
            v = g.get(n)
            if v is not None and type(v) not in _PRIMITIVES and not isinstance(v, _PLAIN):
                watch.append(v)
    return watch


class _ClassData:
    """A class's data attributes, read afresh (a class attribute may be reassigned)."""

    __slots__ = ("cls", "names")

    def __init__(self, cls, names):
        self.cls, self.names = cls, names

    def values(self):
        return {n: getattr(self.cls, n, _MISSING) for n in self.names}


def _snapshot(watch):
    return [_contents(w.values() if isinstance(w, _ClassData) else w) for w in watch]


class ModelState:
    """The objects a capture of `model` depends on; `matches()` re-reads them (a few microseconds)."""

    __slots__ = ("root", "parts", "params", "fwd_globals", "objects", "watch", "contents")

    def __init__(self, model):
        modules = list(model.modules())
        self.root = weakref.ref(model)  # the model itself only weakly: the cache must not keep it alive
        # per module: the module (held for the submodules), its __dict__ and the dicts whose entries matter
        self.parts = [
            (
                m if j else None,
                m.__dict__,
                m.__dict__["_parameters"],
                m.__dict__["_modules"],
                m.__dict__["_buffers"],
                tuple(m.__dict__[h] for h in HOOK_DICTS),
            )
            for j, m in enumerate(modules)
        ]
        self.params = list(model.parameters())
        self.fwd_globals = _user_forward_globals(modules)
        self.objects = self.read()
        self.watch = _watched(modules, self.fwd_globals)  # usually empty: nothing more to compare
        self.contents = _snapshot(self.watch)

    def read(self):
        objects = []
        extend, append = objects.extend, objects.append
        for m, d, params, children, buffers, hooks in self.parts:
            cls = type(m if m is not None else self.root())
            append(cls)
            append(cls.forward)
            extend(d)
            extend(d.values())
            extend(params.values())
            extend(children.values())
            extend(buffers.values())
            extend(map(len, hooks))
        extend([p.dtype for p in self.params])
        extend(map(len, _GLOBAL_HOOKS))
        for g, names in self.fwd_globals:
            extend([g.get(n, _MISSING) for n in names])
        return objects

    def matches(self):
        """Whether every object read now is the one read at capture, or equal to it. Equal objects
        compute the same: equal numbers and strings, and an equal one-element tensor, of the same dtype
        (the dtypes are read too), holding the same value; larger tensors, which cannot compare as one
        bool, and anything whose comparison fails count as changed. With the native module loaded the
        comparison runs in C (csrc/guard.h, the same traversal as read())."""
        root = self.root()
        if root is None:
            return False
        native = _native.loaded()
        try:
            if native is not None:
                same = native.state_matches(
                    self.parts, root, self.params, _GLOBAL_HOOKS, self.fwd_globals, _MISSING, self.objects
                )
            else:
                same = self.read() == self.objects
            return same and (not self.watch or _snapshot(self.watch) == self.contents)
        except Exception:  # noqa: BLE001 - an object that cannot compare is a change
            return False

    def refers_to(self, model):
        """Whether a held object leads back to a module of the model (then caching it would keep the
        model alive): the model itself, or a bound method or closure of one of its modules."""
        ids = {id(part[0]) for part in self.parts[1:]} | {id(model)}
        for obj in self.objects + self.watch:
            if obj is model or id(getattr(obj, "__self__", None)) in ids:
                return True
            for cell in getattr(obj, "__closure__", None) or ():
                if id(cell.cell_contents) in ids:
                    return True
        return False


class Ref:
    """A key part that compares by identity: weakly held when the object allows it."""

    __slots__ = ("_ref", "_obj", "_hash")

    def __init__(self, obj):
        self._hash = id(obj)
        try:
            self._ref, self._obj = weakref.ref(obj), None
        except TypeError:
            self._ref, self._obj = None, obj

    def get(self):
        return self._obj if self._ref is None else self._ref()

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        mine = self.get()
        return isinstance(other, Ref) and mine is not None and mine is other.get()


class Unstable(Exception):
    """A loss reads an object whose contents can change without a new identity (a dict, a list, an
    arbitrary object): its capture cannot be cached."""


def _is_torch_code(fn):
    return (getattr(fn, "__module__", None) or "").startswith("torch")


def _token(value, depth=0):
    """A hashable stand-in for a value a loss reads: the value itself for numbers and strings,
    identity for objects that do not change in place (modules of code, classes, torch functions,
    tensors, whose values the captured loss never bakes in), a key of their own for functions, partials
    and torch loss modules; Unstable for anything else."""
    t = type(value)
    if t in _PRIMITIVES:
        return value
    if t is tuple or t is frozenset:
        return t(_token(v, depth) for v in value)
    if isinstance(
        value, (types.ModuleType, type, types.BuiltinFunctionType, torch.dtype, torch.device, torch.Tensor)
    ) or (callable(value) and _is_torch_code(value) and not isinstance(value, torch.nn.Module)):
        return Ref(value)
    if depth < 4 and isinstance(value, (types.FunctionType, functools.partial, torch.nn.Module, types.MethodType)):
        key, state = loss_key(value, depth + 1)
        if key is not None and state is None:
            return key
    raise Unstable


def _function_key(fn, depth):
    code = fn.__code__
    g = fn.__globals__
    cells = tuple(_token(c.cell_contents, depth) for c in fn.__closure__) if fn.__closure__ else ()
    names = tuple((n, _token(g[n], depth)) for n in code.co_names if n in g)
    kwdefaults = tuple(sorted((k, _token(v, depth)) for k, v in fn.__kwdefaults__.items())) if fn.__kwdefaults__ else ()
    return ("function", code, _token(fn.__defaults__, depth), kwdefaults, cells, names)


def _torch_loss_key(loss_fn):
    """A torch loss module's key: its type and settings (public attributes, buffers such as `weight`
    and `pos_weight`, None or a tensor), or None when it carries hooks, parameters or submodules."""
    d = loss_fn.__dict__
    if any(d[h] for h in HOOK_DICTS) or d["_parameters"] or d["_modules"]:
        return None
    settings = tuple((k, v) for k, v in d.items() if k[0] != "_")
    if not all(type(v) in _PRIMITIVES for _, v in settings):
        return None
    buffers = tuple((k, None if v is None else Ref(v)) for k, v in d["_buffers"].items())
    return ("torch loss", type(loss_fn), settings, buffers)


def loss_key(loss_fn, depth=0):
    """(key, state) for a loss: `key` equals another loss's key only when both compute the same
    thing as long as `state` (a ModelState, or None) still matches; key None: not cacheable (the loss
    reads objects that can change in place), captured afresh on every call.

    A torch loss module is keyed by its type, settings and buffers (users build `nn.MSELoss()` or
    `nn.CrossEntropyLoss()` per call), a function by its code, defaults, closure values and the
    globals it names (a new lambda per call hits the cache), a `functools.partial` by its function
    and arguments, any other module (a custom loss module) or a method of one by identity with its
    state re-read on every call (guard.ModelState: attributes, submodules, hooks)."""
    try:
        if _is_torch_code(loss_fn) and not isinstance(loss_fn, torch.nn.Module):  # F.mse_loss, torch.nn.functional
            return ("torch function", Ref(loss_fn)), None
        if isinstance(loss_fn, types.FunctionType):
            return _function_key(loss_fn, depth), None
        if isinstance(loss_fn, functools.partial):
            keywords = tuple(sorted((k, _token(v, depth)) for k, v in loss_fn.keywords.items()))
            inner, state = loss_key(loss_fn.func, depth + 1)
            return (None, None) if inner is None else (("partial", inner, _token(loss_fn.args, depth), keywords), state)
        if isinstance(loss_fn, torch.nn.Module):
            if type(loss_fn).__module__ == "torch.nn.modules.loss":
                key = _torch_loss_key(loss_fn)
                if key is not None:
                    return key, None
            return ("module", Ref(loss_fn)), ModelState(loss_fn)
        if isinstance(loss_fn, types.MethodType) and isinstance(loss_fn.__self__, torch.nn.Module):
            return ("method", _function_key(loss_fn.__func__, depth), Ref(loss_fn.__self__)), ModelState(
                loss_fn.__self__
            )
        if isinstance(loss_fn, types.BuiltinFunctionType):
            return ("torch function", Ref(loss_fn)), None
    except Unstable:
        pass
    return None, None
