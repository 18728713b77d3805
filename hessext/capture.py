"""nn.Module + loss -> a stack description the native kernels accept, or the reason it is not one.

The model is traced with torch.fx (never guessed from attribute names). Accepted: a single input
tensor, optional shape-only ops on it, Linear layers (bias or not) separated by Tanh or by nothing
(Identity, inactive Dropout), then optional shape-only ops on the output (seed 1 ends in
`x.squeeze(-1)`). Shape-only ops keep the row-major order of the elements, so that the MSE over the
reshaped output equals the MSE over the [M, C] output of the last Linear.

The loss: nn.MSELoss, F.mse_loss (or a functools.partial of it), or a function whose traced graph
is mean/sum of (out - target)**2, like seed 1's `torch.mean((outputs - targets)**2, dim=0)`."""
import functools
import operator
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

IDENTITY, TANH = 0, 1

_SHAPE_METHODS = {"squeeze", "unsqueeze", "flatten", "view", "reshape", "contiguous"}
_SHAPE_FUNCTIONS = {torch.squeeze, torch.unsqueeze, torch.flatten, torch.reshape}
_TANH_FUNCTIONS = {torch.tanh, F.tanh}


class Unsupported(Exception):
    """Why a model or loss is not a native stack; the message is shown to the user."""


@dataclass(frozen=True)
class Linear:
    name: str            # qualified module name, e.g. "fc1" or "0"
    weight: str          # parameter names as in model.named_parameters()
    bias: Optional[str]


@dataclass(frozen=True)
class Stack:
    layers: Tuple[Linear, ...]
    activations: Tuple[int, ...]      # after each hidden layer: IDENTITY or TANH
    pre: Callable                     # shape-only ops on the input (a function of one tensor)
    post: Callable                    # shape-only ops on the output


@dataclass(frozen=True)
class MSE:
    reduction: str                    # "mean" or "sum"
    dims: Optional[Tuple[int, ...]]   # dims reduced; None: all of them


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
    return functools.reduce(lambda f, g: (lambda t: g(f(t))), fns, lambda t: t)


def _module_kind(module):
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.Tanh:
        return "tanh"
    if type(module) is nn.Identity or (type(module) is nn.Dropout and (module.p == 0 or not module.training)):
        return "identity"
    if type(module) is nn.Flatten:
        return "shape"
    return None


def capture_model(model: nn.Module) -> Stack:
    """Trace `model` and describe it as a Linear/Tanh stack; raises Unsupported with the reason."""
    if type(model) is nn.Linear:  # a lone Linear is traced through its own forward, so say it directly
        layer = Linear("", "weight", "bias" if model.bias is not None else None)
        return Stack((layer,), (), lambda t: t, lambda t: t)
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:
        raise Unsupported(f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc})")
    modules = dict(model.named_modules())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise Unsupported(f"{type(model).__name__}.forward takes {len(placeholders)} inputs, not one tensor")
    layers, acts, pre, post = [], [], [], []
    pending_act = None
    current = placeholders[0]
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            if node.op == "get_attr":
                raise Unsupported(f"the model reads attribute '{node.target}' directly in forward")
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise Unsupported("the model's output is not the end of a single chain of layers")
            break
        others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if not node.args or node.args[0] is not current or len(current.users) > 1 or others:
            raise Unsupported(f"'{node.name}' is not part of a single chain of layers (branches or skips)")
        kind = _module_kind(modules[node.target]) if node.op == "call_module" else None
        if kind is None and node.op != "call_module":
            if node.target in _TANH_FUNCTIONS or (node.op == "call_method" and node.target == "tanh"):
                kind = "tanh"
            elif _shape_op(node) is not None:
                kind = "shape"
        if kind is None:
            what = type(modules[node.target]).__name__ if node.op == "call_module" else str(node.target)
            raise Unsupported(f"layer '{node.name}' ({what}) has no native kernel (native: Linear, Tanh)")
        if kind == "linear":
            if post:
                raise Unsupported(f"shape op before Linear '{node.target}' in the middle of the stack")
            if layers:
                acts.append(pending_act if pending_act is not None else IDENTITY)
            elif pending_act is not None:
                raise Unsupported(f"an activation before the first Linear ('{node.name}')")
            module = modules[node.target]
            if any(layer.name == node.target for layer in layers):
                raise Unsupported(f"Linear '{node.target}' is used twice (shared weights)")
            prefix = node.target + "." if node.target else ""
            layers.append(Linear(node.target, prefix + "weight", prefix + "bias" if module.bias is not None else None))
            pending_act = None
        elif kind == "shape":
            fn = (lambda m: (lambda t: m(t)))(modules[node.target]) if node.op == "call_module" else _shape_op(node)
            (post if layers else pre).append(fn)
            if layers and pending_act is not None:
                raise Unsupported(f"an activation after the last Linear ('{node.name}')")
        elif kind in ("tanh", "identity"):
            if not layers or post:
                raise Unsupported(f"'{node.name}' must stand between two Linear layers")
            if pending_act is not None and kind == "tanh":
                raise Unsupported(f"two activations in a row at '{node.name}'")
            if kind == "tanh":
                pending_act = TANH
        current = node
    if not layers:
        raise Unsupported("the model has no Linear layer")
    if pending_act is not None:
        raise Unsupported("the model ends in an activation after its last Linear")
    used = {p for layer in layers for p in (layer.weight, layer.bias) if p}
    unused = [name for name, _ in model.named_parameters() if name not in used]
    if unused:
        raise Unsupported(f"parameters {unused} are not weights of the traced Linear layers")
    return Stack(tuple(layers), tuple(acts), _compose(pre), _compose(post))


def _reduction_of(node):
    """(reduction, dims) of a mean/sum node, or None."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if name not in ("mean", "sum") or node.op not in ("call_method", "call_function"):
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


def capture_loss(loss_fn) -> MSE:
    """Describe `loss_fn` as an MSE; raises Unsupported with the reason."""
    if isinstance(loss_fn, nn.MSELoss):
        if loss_fn.reduction not in ("mean", "sum"):
            raise Unsupported(f"nn.MSELoss(reduction='{loss_fn.reduction}') does not return a scalar")
        return MSE(loss_fn.reduction, None)
    if loss_fn is F.mse_loss:
        return MSE("mean", None)
    if isinstance(loss_fn, functools.partial) and loss_fn.func is F.mse_loss and not loss_fn.args:
        reduction = loss_fn.keywords.get("reduction", "mean")
        if set(loss_fn.keywords) - {"reduction"} or reduction not in ("mean", "sum"):
            raise Unsupported(f"F.mse_loss with {loss_fn.keywords} is not a scalar MSE")
        return MSE(reduction, None)
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    try:
        graph = torch.fx.symbolic_trace(loss_fn).graph
    except Exception as exc:
        raise Unsupported(f"loss '{name}' has no native kernel (native: MSE), and torch.fx cannot trace it ({exc})")
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    not_mse = Unsupported(f"loss '{name}' has no native kernel (native: MSE, mean or sum)")
    if len(inputs) != 2:
        raise not_mse
    out, tgt = inputs
    if len(nodes) == 1 and nodes[0].target is F.mse_loss and nodes[0].args[:2] == (out, tgt):
        kwargs = {k: v for k, v in nodes[0].kwargs.items() if v is not None}  # fx records the defaults
        reduction = kwargs.get("reduction", "mean")
        if reduction not in ("mean", "sum") or len(nodes[0].args) > 2 or set(kwargs) - {"reduction"}:
            raise not_mse
        return MSE(reduction, None)
    if len(nodes) != 3:
        raise not_mse
    diff, square, reduce = nodes
    is_diff = diff.op == "call_function" and diff.target in (operator.sub, torch.sub) and set(diff.args) == {out, tgt}
    red = _reduction_of(reduce) if reduce.args and reduce.args[0] is square else None
    if not (is_diff and not diff.kwargs and _is_square_of(square, diff) and red):
        raise not_mse
    return MSE(*red)
