"""nn.Module + loss -> a stack description the native kernels accept, or the reason it is not one.

The model is traced at the level of the functions it actually calls (`F.linear`, `torch.tanh`,
`F.relu`, `F.dropout`, shape methods, ...): `model(proxy)` runs through the ordinary
`nn.Module.__call__`, and only the torch functions that see a `torch.fx.Proxy` are recorded.
Nothing global is patched (torch.fx.symbolic_trace patches `nn.Module.__call__` for every thread),
and a subclass with its own `forward`, a monkeypatched `forward` or an attribute that `forward`
branches on is captured as what it computes, never assumed from a type. Modules with hooks are
refused before tracing (the fallback runs them).

Accepted: a single input tensor, optional shape-only ops on it, `F.linear` layers (bias or not)
separated by at most one activation of the table below (or nothing: identity, inactive dropout),
then optional shape-only ops on the output (the 1-16-1 network ends in `x.squeeze(-1)`), or a final
`log_softmax` over the last dim (a log-softmax classifier). Shape-only ops keep the row-major order of the
elements, so an elementwise loss over the reshaped output equals the loss over the [M, C] output
of the last Linear.

The loss: a traced graph that is `c * <loss>(out, target)`, c an optional constant factor
(`0.5 * ...`, `... / 2`), with <loss> one of `F.mse_loss` or `mean/sum((out - target)**2)`,
`F.huber_loss`, `F.binary_cross_entropy_with_logits`, `F.cross_entropy` (class indices or
probabilities, label smoothing, ignore_index), `F.nll_loss` after the model's `log_softmax`; the
nn.Module losses call these. Class weights and pos_weight stay with torch."""

import dataclasses
import inspect
import math
import operator
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

# Rows of csrc/activations.h (Act) and csrc/losses.h (Loss); the numbers are the kernels'.
# The rows of csrc/activations.h and csrc/losses.h by name, in their enum order (the kernels' codes;
# tests/test_capture.py checks them against hessext._C.table_names()).
ACTIVATION_ROWS = ("identity", "tanh", "relu", "leaky_relu", "sigmoid", "silu", "gelu", "gelu_tanh", "softplus", "elu")
LOSS_ROWS = ("mse", "huber", "bce_with_logits", "softmax_cross_entropy")
IDENTITY, TANH, RELU, LEAKY_RELU, SIGMOID, SILU, GELU, GELU_TANH, SOFTPLUS, ELU = range(len(ACTIVATION_ROWS))
MSE_LOSS, HUBER, BCE_WITH_LOGITS, SOFTMAX_CE = range(len(LOSS_ROWS))
NATIVE_DTYPES = (torch.float32, torch.float64)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

_SHAPE_METHODS = {"squeeze", "unsqueeze", "flatten", "view", "reshape", "contiguous"}
_SHAPE_FUNCTIONS = {torch.squeeze, torch.unsqueeze, torch.flatten, torch.reshape}
_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax}
_LINEAR_FUNCTIONS = {F.linear}
_REDUCTIONS = {"mean", "sum"}


class Unsupported(Exception):
    """Why a model or loss is not a native stack; the message is shown to the user."""


@dataclass(frozen=True)
class Linear:
    name: str  # qualified module name, e.g. "fc1" or "0" ("" for a lone Linear)
    weight: str  # parameter names as in model.named_parameters()
    bias: Optional[str]


@dataclass(frozen=True)
class Activation:
    kind: int  # a row of csrc/activations.h
    p0: float = 0.0  # negative_slope, beta or alpha
    p1: float = 0.0  # Softplus's threshold
    fn: Optional[Callable] = field(default=None, compare=False)  # the torch function captured (None: identity)


@dataclass(frozen=True)
class Stack:
    layers: Tuple[Linear, ...]
    activations: Tuple[Activation, ...]  # after each hidden layer
    pre: Callable  # shape-only ops on the input (a function of one tensor)
    post: Callable  # shape-only ops on the output
    log_softmax: Optional[int] = None  # the dim of a final log_softmax (-1, or 1 of a 2-D output)


@dataclass(frozen=True)
class Loss:
    kind: int  # a row of csrc/losses.h
    reduction: str  # "mean" or "sum"
    dims: Optional[Tuple[int, ...]] = None  # dims reduced (a mean/sum written by hand); None: all
    factor: float = 1.0  # constant factor in front of the loss
    param: float = 0.0  # Huber's delta
    label_smoothing: float = 0.0  # cross-entropy
    ignore_index: int = -100  # cross-entropy / NLL with class indices
    nll: bool = False  # NLLLoss: the model must end in log_softmax

    @property
    def classes(self):
        """Whether the loss reads class targets over the last output dim (softmax cross-entropy)."""
        return self.kind == SOFTMAX_CE


class _Recorder(torch.fx.Tracer):
    """Records the torch functions that a callable applies to Proxy arguments. Parameters become
    get_attr nodes named as in `named_parameters()`; any other tensor, or a module, passed to a torch
    function is refused (it would be baked in as a constant)."""

    def __init__(self, param_names, owner):
        super().__init__(autowrap_modules=())
        self._param_names = param_names  # id(parameter) -> name
        self._owner = owner  # "forward" or "loss '<name>'", for the message

    def record(self, fn, nargs):
        self.root = nn.Module()
        self.graph = torch.fx.Graph()
        self.tensor_attrs = {}
        self.submodule_paths = None
        args = [self.create_proxy("placeholder", f"input{j}", (), {}) for j in range(nargs)]
        out = fn(*args)
        self.create_node("output", "output", (self.create_arg(out),), {})
        return self.graph

    def create_arg(self, a):
        if isinstance(a, torch.Tensor):
            name = self._param_names.get(id(a))
            if name is None or not isinstance(a, nn.Parameter):
                raise Unsupported(
                    f"{self._owner} uses a tensor that is not one of the model's parameters "
                    f"(shape {tuple(a.shape)}): a buffer, a class weight, a constant or a "
                    "reparametrised weight"
                )
            return self.create_node("get_attr", name, (), {})
        if isinstance(a, nn.Module):
            raise Unsupported(f"forward passes the module {type(a).__name__} to a function")
        return super().create_arg(a)


def hooks_of(named_modules):
    """The first '<kind> hook on <where>' found among (name, module) pairs and the global hooks, or None."""
    from torch.nn.modules import module as torch_module

    for kind in ("forward", "forward_pre", "backward", "backward_pre"):
        if getattr(torch_module, f"_global_{kind}_hooks"):
            return f"a global module {kind.replace('_', '-')} hook is registered"
    for name, m in named_modules:
        for attr in HOOK_DICTS:
            if m.__dict__.get(attr):
                kind = attr[1:-1].replace("_", "-")
                return (
                    f"a {kind} is registered on {'the loss' if name is None else repr(name) if name else 'the model'}"
                )
    return None


def _trace(fn, nargs, param_names, what, owner):
    try:
        return _Recorder(param_names, owner).record(fn, nargs)
    except Unsupported:
        raise
    except Exception as exc:
        raise Unsupported(f"{what} cannot be traced as a chain of torch functions ({type(exc).__name__}: {exc})")


def _trace_untouched(model, param_names):
    """The model's forward traced, with every module's attributes as they were before: a forward that
    stores on self (`self.last = h`) would leave a tracing Proxy there. Such a forward has a side
    effect the kernels would skip, so it is refused (it runs through torch)."""
    before = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        graph = _trace(model, 1, param_names, type(model).__name__, "forward")
    finally:
        changed = []
        for m, d in before:
            now = m.__dict__
            names = [k for k in now if k not in d or now[k] is not d[k]] + [k for k in d if k not in now]
            if names:
                changed += [f"{type(m).__name__}.{k}" for k in names]
                now.clear()
                now.update(d)
    if changed:
        raise Unsupported(f"forward assigns {', '.join(changed)} (a side effect on the module; runs through torch)")
    return graph


def _shape_op(node):
    """A function applying this shape-only node to a tensor, or None if the node is not one."""
    args, kwargs = node.args[1:], node.kwargs
    if any(isinstance(a, torch.fx.Node) for a in list(args) + list(kwargs.values())):
        return None
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return lambda t: getattr(t, node.target)(*args, **kwargs)
    if node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
        return lambda t: node.target(t, *args, **kwargs)
    return None


def _compose(fns):
    def apply(t):
        for fn in fns:
            t = fn(t)
        return t

    return apply


def _arg(node, pos, name, default):
    """Argument `name` of a recorded call (position `pos` counts the input as 0)."""
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class _ActivationRow:
    """How capture recognises one row of csrc/activations.h: the torch functions (and Tensor methods,
    which take no arguments) that call it, an argument that selects it among rows sharing a function
    (name, position, value), its parameters p0, p1 as (name, position, default), whether their values
    are ones the kernels take, and the torch function with them (None: the identity)."""

    kind: int
    functions: tuple = ()
    methods: tuple = ()
    select: Optional[tuple] = None
    params: tuple = ()
    valid: Callable = lambda *p: True
    fn: Callable = lambda *p: None


_ACTIVATION_TABLE = (  # in the kernels' order: _ACTIVATION_TABLE[kind].kind == kind
    _ActivationRow(IDENTITY),
    _ActivationRow(TANH, (torch.tanh, F.tanh), ("tanh",), fn=lambda: torch.tanh),
    _ActivationRow(RELU, (torch.relu, F.relu), ("relu",), fn=lambda: torch.relu),
    _ActivationRow(
        LEAKY_RELU,
        (F.leaky_relu,),
        params=(("negative_slope", 1, 0.01),),
        fn=lambda slope: partial(F.leaky_relu, negative_slope=slope),
    ),
    _ActivationRow(SIGMOID, (torch.sigmoid, F.sigmoid), ("sigmoid",), fn=lambda: torch.sigmoid),
    _ActivationRow(SILU, (F.silu,), fn=lambda: F.silu),
    _ActivationRow(GELU, (F.gelu,), select=("approximate", 1, "none"), fn=lambda: partial(F.gelu, approximate="none")),
    _ActivationRow(
        GELU_TANH, (F.gelu,), select=("approximate", 1, "tanh"), fn=lambda: partial(F.gelu, approximate="tanh")
    ),
    _ActivationRow(
        SOFTPLUS,
        (F.softplus,),
        params=(("beta", 1, 1.0), ("threshold", 2, 20.0)),
        valid=lambda beta, threshold: beta != 0,
        fn=lambda beta, threshold: partial(F.softplus, beta=beta, threshold=threshold),
    ),
    _ActivationRow(ELU, (F.elu,), params=(("alpha", 1, 1.0),), fn=lambda alpha: partial(F.elu, alpha=alpha)),
)
_BY_FUNCTION, _BY_METHOD = {}, {}
for _r in _ACTIVATION_TABLE:
    for _f in _r.functions:
        _BY_FUNCTION.setdefault(_f, []).append(_r)
    for _m in _r.methods:
        _BY_METHOD[_m] = _r


def torch_function(kind, p0=0.0, p1=0.0):
    """The torch function of an activations.h row with its parameters (None: the identity)."""
    row = _ACTIVATION_TABLE[kind]
    return row.fn(*(p0, p1)[: len(row.params)])


def _activation(node):
    """The Activation row for an activation call node (with the torch function it calls), None if the
    node is none (or has no row)."""
    if node.op == "call_method":
        row = _BY_METHOD.get(node.target)
        ok = row is not None and len(node.args) == 1 and not node.kwargs
        return Activation(row.kind, fn=row.fn()) if ok else None
    if node.op != "call_function":
        return None
    for row in _BY_FUNCTION.get(node.target, ()):
        if row.select is not None and _arg(node, row.select[1], row.select[0], row.select[2]) != row.select[2]:
            continue
        values = [_arg(node, pos, name, default) for name, pos, default in row.params]
        if not all(_number(v) for v in values) or not row.valid(*values):
            return None
        values = [float(v) for v in values]
        return Activation(row.kind, *values, fn=row.fn(*values))
    return None


def _is_log_softmax(node):
    """Whether the node is log_softmax over the last dim (dim -1; dim 1 of a 2-D output is checked per call)."""
    if node.op == "call_method" and node.target == "log_softmax":
        dim = _arg(node, 1, "dim", None)
    elif node.op == "call_function" and node.target in _LOG_SOFTMAX:
        dim = _arg(node, 1, "dim", None)
        if _arg(node, 3 if node.target is F.log_softmax else 2, "dtype", None) is not None:
            return False
    else:
        return False
    return dim in (-1, 1)


def _kind(node):
    """'linear', 'act', 'identity', 'log_softmax', 'shape', 'active-dropout' or None (no native kernel)."""
    target = node.target
    if node.op == "call_function" and target in _LINEAR_FUNCTIONS:
        return "linear"
    if _activation(node) is not None:
        return "act"
    if node.op == "call_function" and target is F.dropout:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return "identity" if (p == 0 or not training) else "active-dropout"
    if _is_log_softmax(node):
        return "log_softmax"
    if _shape_op(node) is not None:
        return "shape"
    return None


def _describe(node):
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def capture_model(model: nn.Module) -> Stack:
    """Trace `model` and describe it as a Linear/Tanh stack; raises Unsupported with the reason."""
    named = list(model.named_parameters(remove_duplicate=False))
    param_names, seen = {}, {}
    for name, p in named:
        if id(p) in seen:
            raise Unsupported(f"parameters '{seen[id(p)]}' and '{name}' are the same tensor (tied weights)")
        seen[id(p)] = param_names[id(p)] = name
        if p.numel() == 0:
            raise Unsupported(f"parameter '{name}' has shape {tuple(p.shape)}: a layer of width 0")
    dtypes = {p.dtype for _, p in named}
    if dtypes - set(NATIVE_DTYPES):
        raise Unsupported(
            f"the parameters are {sorted(map(str, dtypes))}: the native kernels serve float32 and float64"
        )
    hook = hooks_of(model.named_modules())
    if hook:
        raise Unsupported(f"{hook} (hooks run only through torch)")
    graph = _trace_untouched(model, param_names)
    layers, acts, pre, post = [], [], [], []
    pending_act, log_softmax = None, None
    where = "the input"
    current = next(n for n in graph.nodes if n.op == "placeholder")
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise Unsupported("the model's output is not the end of a single chain of layers")
            break
        others = [
            a
            for a in list(node.args[1:]) + list(node.kwargs.values())
            if isinstance(a, torch.fx.Node) and a.op != "get_attr"
        ]
        if not node.args or node.args[0] is not current or len(current.users) > 1 or others:
            raise Unsupported(
                f"'{_describe(node)}' after {where} is not part of a single chain of layers (branches or skips)"
            )
        kind = _kind(node)
        if log_softmax is not None:
            raise Unsupported(f"'{_describe(node)}' after the final log_softmax")
        if kind is None:
            raise Unsupported(
                f"'{_describe(node)}' after {where} has no native kernel (native: Linear, Tanh, ReLU, "
                "LeakyReLU, Sigmoid, SiLU, GELU, Softplus, ELU, Identity, inactive Dropout, shape ops, "
                "a final LogSoftmax)"
            )
        if kind == "active-dropout":
            raise Unsupported(f"Dropout after {where} is active (training mode, p > 0)")
        if kind == "linear":
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
                raise Unsupported(f"a linear after {where} has no parameter as its weight")
            if post:
                raise Unsupported(f"shape op before Linear '{weight.target}' in the middle of the stack")
            if layers:
                acts.append(pending_act if pending_act is not None else Activation(IDENTITY))
            elif pending_act is not None:
                raise Unsupported(f"an activation before the first Linear ('{weight.target}')")
            names = [weight.target] + ([bias.target] if isinstance(bias, torch.fx.Node) else [])
            if any(n in (layer.weight, layer.bias) for layer in layers for n in names):
                raise Unsupported(f"parameter '{weight.target}' is used by two layers (shared weights)")
            layer_name = weight.target.rpartition(".")[0]
            layers.append(Linear(layer_name, weight.target, bias.target if isinstance(bias, torch.fx.Node) else None))
            where = f"Linear '{layer_name}'" if layer_name else "the Linear"
            pending_act = None
        elif kind == "shape":
            (post if layers else pre).append(_shape_op(node))
            if layers and pending_act is not None:
                raise Unsupported(f"an activation after the last Linear ({where})")
        elif kind == "log_softmax":
            if not layers or pending_act is not None or post:
                raise Unsupported(f"log_softmax after {where}: native only right after the last Linear")
            log_softmax = _arg(node, 1, "dim", None)
        else:  # an activation or the identity
            if not layers or post:
                raise Unsupported(f"'{_describe(node)}' must stand between two Linear layers")
            if pending_act is not None and kind == "act":
                raise Unsupported(f"two activations in a row after {where}")
            if kind == "act":
                pending_act = _activation(node)
        current = node
    if not layers:
        raise Unsupported("the model has no Linear layer")
    if pending_act is not None:
        raise Unsupported("the model ends in an activation after its last Linear")
    used = {p for layer in layers for p in (layer.weight, layer.bias) if p}
    unused = [name for name, _ in named if name not in used]
    if unused:
        raise Unsupported(f"parameters {unused} are not weights of the traced Linear layers")
    return Stack(tuple(layers), tuple(acts), _compose(pre), _compose(post), log_softmax)


def _reduction_of(node):
    """(reduction, dims) of a mean/sum node, or None."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if name not in _REDUCTIONS or node.op not in ("call_method", "call_function"):
        return None
    if node.kwargs.get("keepdim") or (len(node.args) > 2 and node.args[2]) or node.kwargs.get("dtype"):
        return None
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dims is not None and not isinstance(dims, (int, tuple, list)):
        return None
    return name, (dims,) if isinstance(dims, int) else (tuple(dims) if dims is not None else None)


def _is_square_of(node, inner):
    op, target, args = node.op, node.target, node.args
    if op == "call_function" and target in (operator.pow, torch.pow) and args[0] is inner and args[1] == 2:
        return True
    if op == "call_method" and target == "pow" and args[0] is inner and args[1:] == (2,):
        return True
    if op == "call_function" and target in (operator.mul, torch.mul) and args == (inner, inner):
        return True
    return (op, target) in (("call_function", torch.square), ("call_method", "square")) and args[0] is inner


def _factor(node, inner):
    """The constant c when node is c * inner, inner * c or inner / c; else None."""
    if node.op != "call_function" or inner not in node.args or node.kwargs:
        return None
    other = node.args[1] if node.args[0] is inner else node.args[0]
    if not _number(other):
        return None
    if node.target in (operator.mul, torch.mul):
        return float(other)
    if node.target in (operator.truediv, torch.div) and node.args[0] is inner and other != 0:
        return 1.0 / other
    return None


def _squares_of(nodes, out, tgt):
    """(reduction, dims) when `nodes` are mean/sum((out - tgt)**2) written by hand, else None."""
    if len(nodes) != 3:
        return None
    diff, square, reduce = nodes
    is_diff = diff.op == "call_function" and diff.target in (operator.sub, torch.sub) and set(diff.args) == {out, tgt}
    red = _reduction_of(reduce) if reduce.args and reduce.args[0] is square else None
    if is_diff and not diff.kwargs and _is_square_of(square, diff) and red:
        return red
    return None


_LOSS_FUNCTIONS = {
    F.mse_loss: MSE_LOSS,
    F.huber_loss: HUBER,
    F.binary_cross_entropy_with_logits: BCE_WITH_LOGITS,
    F.cross_entropy: SOFTMAX_CE,
    F.nll_loss: SOFTMAX_CE,
}


def _loss_call(node, out, tgt, name):
    """The Loss for one call of a torch loss function on (out, tgt), None if it is none; raises
    Unsupported for a known loss with settings the kernels do not serve."""
    fn = node.target
    if node.op != "call_function" or fn not in _LOSS_FUNCTIONS:
        return None
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    if a["input"] is not out or a["target"] is not tgt:
        return None
    if a.get("size_average") is not None or a.get("reduce") is not None:
        raise Unsupported(f"loss '{name}' uses the legacy size_average/reduce arguments")
    for extra in ("weight", "pos_weight"):
        if a.get(extra) is not None:
            raise Unsupported(f"loss '{name}' has {extra}= (weighted losses run through torch)")
    if a["reduction"] not in _REDUCTIONS:
        return None
    kind = _LOSS_FUNCTIONS[fn]
    delta, smoothing, ignore = a.get("delta", 0.0), a.get("label_smoothing", 0.0), a.get("ignore_index", -100)
    if not (_number(delta) and _number(smoothing) and isinstance(ignore, int)):
        return None
    if kind == HUBER and not delta > 0:
        raise Unsupported(f"loss '{name}' has delta={delta}: the native Huber loss needs delta > 0")
    if not 0 <= smoothing <= 1:
        return None
    return Loss(kind, a["reduction"], None, 1.0, float(delta), float(smoothing), ignore, fn is F.nll_loss)


def capture_loss(loss_fn) -> Loss:
    """Describe `loss_fn` as a (scaled) row of the loss table; raises Unsupported with the reason."""
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    if isinstance(loss_fn, nn.Module):
        hook = hooks_of([(None, m) for m in loss_fn.modules()])
        if hook:
            raise Unsupported(f"{hook} (hooks run only through torch)")
        if getattr(loss_fn, "reduction", "mean") == "none":
            raise Unsupported(f"{type(loss_fn).__name__}(reduction='none') does not return a scalar")
    graph = _trace(loss_fn, 2, {}, f"loss '{name}'", f"loss '{name}'")
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    out, tgt = [n for n in graph.nodes if n.op == "placeholder"]
    result = next(n for n in graph.nodes if n.op == "output").args[0]
    factor, loss = 1.0, None
    if nodes and result is nodes[-1]:
        c = _factor(nodes[-1], nodes[-2]) if len(nodes) >= 2 else None
        if c is not None:
            factor, nodes = c, nodes[:-1]
        if len(nodes) == 1:
            loss = _loss_call(nodes[0], out, tgt, name)
        else:
            red = _squares_of(nodes, out, tgt)
            loss = Loss(MSE_LOSS, red[0], red[1]) if red else None
    if loss is None:
        raise Unsupported(
            f"loss '{name}' has no native kernel (native: MSE, Huber, BCEWithLogits, CrossEntropy, "
            "NLL after LogSoftmax; mean or sum, times a constant)"
        )
    return dataclasses.replace(loss, factor=factor)


def check_pair(stack: Stack, loss: Loss):
    """A model's end and its loss must fit: NLL reads log-probabilities, a log_softmax feeds only
    NLL or cross-entropy (whose own log_softmax then changes nothing)."""
    if loss.nll and stack.log_softmax is None:
        raise Unsupported("NLLLoss needs log-probabilities: native only when the model ends in LogSoftmax(dim=-1)")
    if stack.log_softmax is not None and loss.kind != SOFTMAX_CE:
        raise Unsupported("the model ends in LogSoftmax: native only with NLLLoss or CrossEntropyLoss")
