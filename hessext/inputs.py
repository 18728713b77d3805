"""Validate the user's arguments and convert between their formats and the kernels' layout.

Every check runs before any kernel and raises a ValueError/TypeError that names the argument
(`inputs`, `targets`, `params`, `vectors`) and says what was expected."""

from collections.abc import Mapping

import torch

from hessext import _native


def _describe(t):
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def chosen(names, tensors, keys):
    """Positions of the parameters a call covers: those named in `keys` (the names of `params=`), or,
    without keys, those that require grad, as torch.optim trains them (all of them when none does)."""
    if keys is not None:
        return [j for j, n in enumerate(names) if n in keys]
    trainable = [j for j, t in enumerate(tensors) if t.requires_grad]
    return trainable if trainable and len(trainable) < len(tensors) else range(len(tensors))


def check_params(plan, params):
    """(the parameter tensors in named_parameters() order, the positions of those the quantities are
    taken in). Without `params`: the module's own tensors, and the positions of those that require
    grad, as torch.optim trains them (all of them when none does). With `params` (a dict name ->
    tensor, all of the model's names or some of them): its tensors replace the module's, and its names
    are the positions; the others keep the module's tensors."""
    own = plan.parameters()
    if not own:
        raise ValueError("model has no parameters: there is no Hessian with respect to its weights")
    if params is None:
        return own, chosen(plan.param_names, own, None)
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a dict name -> tensor like dict(model.named_parameters()), got {type(params).__name__}"
        )
    names = plan.param_names
    extra = [n for n in params if n not in names]
    if extra or not params:
        raise ValueError(
            f"params must map some or all of the model's parameter names {names} to tensors; unexpected {extra}"
            if extra
            else "params is empty: name at least one parameter"
        )
    tensors, selected = [], []
    for j, (name, ref) in enumerate(zip(names, own)):
        if name not in params:
            tensors.append(ref)
            continue
        t = params[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"params['{name}'] must be a tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(f"params['{name}'] must have shape {tuple(ref.shape)}, got {tuple(t.shape)}")
        if t.dtype != ref.dtype or t.device != ref.device:
            raise TypeError(f"params['{name}'] must be {ref.dtype} on {ref.device} like the model, got {_describe(t)}")
        tensors.append(t)
        selected.append(j)
    return tensors, (range(len(own)) if len(selected) == len(own) else selected)


def check_batch(inputs, targets, ref, loss, targets_needed=True):
    """inputs: floating, the parameters' dtype and device, at least one sample; targets: a tensor on
    the same device, or None for model-only quantities (targets_needed=False). For the native
    path (`loss`, the captured loss; None for the fallback) targets have the parameters' dtype,
    or are integer class indices for cross-entropy and NLL."""
    checked = (("inputs", inputs), ("targets", targets)) if targets_needed else (("inputs", inputs),)
    for name, t in checked:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense tensor, got layout {t.layout}; pass {name}.to_dense()")
        if t.device != ref.device:
            raise ValueError(f"{name} must be on {ref.device} like the model's parameters, got {t.device}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must hold at least one sample, got shape {tuple(inputs.shape)}")
    if loss is None and not inputs.is_floating_point():
        return  # integer inputs (token ids of an Embedding) reach the model as they are, through torch.func
    if not inputs.is_floating_point() or inputs.dtype != ref.dtype:
        raise TypeError(f"inputs must have dtype {ref.dtype} like the model's parameters, got {inputs.dtype}")
    if loss is None or not targets_needed:
        return
    indices = targets.dtype in _INDEX_DTYPES
    if loss.nll and not indices:
        raise TypeError(f"targets of NLLLoss must be class indices (an integer tensor), got {targets.dtype}")
    if not (indices and loss.classes) and targets.dtype != ref.dtype:
        kinds = " or integer class indices" if loss.classes else ""
        raise TypeError(f"targets must have dtype {ref.dtype} like the model's parameters{kinds}, got {targets.dtype}")


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_samples(inputs, what):
    """Per-sample quantities need a leading batch dimension: inputs [N, *features], floating point."""
    if not inputs.is_floating_point():
        raise TypeError(f"{what} differentiates in the inputs, which must be floating point, got {inputs.dtype}")
    if inputs.dim() < 2:
        raise ValueError(
            f"{what} needs inputs with a batch dimension [N, *features], got shape "
            f"{tuple(inputs.shape)}; for one sample pass inputs.unsqueeze(0)"
        )


def transformed(*tensors):
    """Whether any tensor is being differentiated or batched by torch.func (grad, vjp, jvp, vmap).
    Outside every transform (no functorch level) no tensor is: one call then answers for all."""
    if _functorch_level() is None:
        return False
    return any(_is_wrapped(t) for t in tensors if isinstance(t, torch.Tensor))


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_functorch_level = torch._C._functorch.maybe_current_level


def finite(*tensors):
    """Whether every entry of the (native path's) tensors is finite."""
    return _native.load().all_finite(list(tensors))


def capturing(inputs):
    """Whether `inputs` are CUDA tensors and the current stream is capturing a CUDA graph."""
    return inputs.is_cuda and torch.cuda.is_current_stream_capturing()


def native_inputs(plan, inputs, tensors):
    """(x [M, n_0], the model's output shape for these inputs, C) for the native kernels."""
    try:
        x = plan.stack.pre(inputs)
    except RuntimeError as exc:
        raise ValueError(f"inputs of shape {tuple(inputs.shape)} do not fit the model's input ops: {exc}")
    n0 = tensors[plan.weight_pos[0]].shape[1]
    if x.dim() == 0 or x.shape[-1] != n0:
        raise ValueError(
            f"inputs must have {n0} features (the in_features of Linear "
            f"'{plan.stack.layers[0].name}'), got shape {tuple(inputs.shape)}"
        )
    C = tensors[plan.weight_pos[-1]].shape[0]
    out_shape = plan.output_shape(tuple(x.shape), C)
    M = x.numel() // n0
    return (x if x.dim() == 2 else x.reshape(M, n0)), out_shape, C


def rows_are_samples(inputs, x):
    """Whether the kernels' rows x [M, n_0] are the samples inputs[n] flattened (no regrouping)."""
    return x.shape[0] == inputs.shape[0] and x.shape[1] == inputs[0].numel()


def class_layout(plan, inputs):
    """Whether cross-entropy reads the classes where the kernels put them: an output [M, C] or [C]
    (a single sample), classes last. Other layouts (classes in dim 1 of [N, C, ...]) take torch."""
    try:
        x = plan.stack.pre(inputs)
    except RuntimeError:
        return True  # native_inputs reports the shape error
    C = plan.parameters()[plan.weight_pos[-1]].shape[0]
    if x.dim() == 0 or x.dim() > 2:
        return False
    out_shape = plan.output_shape(tuple(x.shape), C)
    return len(out_shape) in (1, 2) and out_shape[-1] == C and (plan.stack.log_softmax != 1 or len(out_shape) == 2)


def _class_rows(loss, targets, out_shape, M, C, ref):
    """(y [M, C], the target distribution of each row, and the number of rows a mean divides by):
    one-hot rows of class indices (zero rows where ignore_index), or the given probabilities;
    label smoothing mixes in the uniform distribution as torch does."""
    eps = loss.label_smoothing
    if targets.is_floating_point():
        if tuple(targets.shape) != out_shape:
            raise ValueError(
                f"targets as class probabilities must have shape {out_shape} (the model's output), "
                f"got {tuple(targets.shape)}"
            )
        y = targets.reshape(M, C)
        return (y * (1 - eps) + eps / C if eps else y), M
    if tuple(targets.shape) != out_shape[:-1]:
        raise ValueError(
            f"targets as class indices must have shape {out_shape[:-1]} (the model's output "
            f"{out_shape} without its class dim), got {tuple(targets.shape)}"
        )
    t = targets.reshape(M).long()
    kept = t != loss.ignore_index
    bad = kept & ((t < 0) | (t >= C))
    if bool(bad.any()):
        raise ValueError(
            f"targets must hold class indices in [0, {C}) or ignore_index={loss.ignore_index}, got {int(t[bad][0])}"
        )
    keep = kept.unsqueeze(1).to(ref.dtype)
    y = torch.zeros(M, C, dtype=ref.dtype, device=ref.device).scatter_(1, t.clamp(0, C - 1).unsqueeze(1), 1.0)
    y.mul_(keep)
    if eps:
        y.mul_(1 - eps).add_(keep * (eps / C))
    return y, int(kept.sum())


_LAYOUTS_PER_PLAN = 64


def native_batch(plan, inputs, targets, tensors):
    """(x [M, n_0], y [M, C], scale of the loss sum over rows) for the native kernels. For regression
    losses the layout depends only on the shapes: the checks run on a shape pair's first call, and the
    plan keeps (M, n_0, C, scale, whether y is a reshape) for the next ones (the 1-16-1 network: 1.4 -> 0.5 us)."""
    loss = plan.loss
    key = None if loss.classes else (inputs.shape, targets.shape)
    known = plan.batch_layouts.get(key) if key is not None else None
    if known is not None:
        M, n0, C, scale, reshape_y = known
        x = plan.stack.pre(inputs)
        return (x if x.dim() == 2 else x.reshape(M, n0)), _target_rows(targets, M, C, reshape_y), scale
    x, out_shape, C = native_inputs(plan, inputs, tensors)
    M = x.shape[0]
    if loss.classes:
        y, count = _class_rows(loss, targets, out_shape, M, C, tensors[0])
        mean = loss.factor / count if count else 0.0  # every target ignored: torch's derivatives are 0
        return x, y, mean if loss.reduction == "mean" else loss.factor
    if tuple(targets.shape) != out_shape:
        raise ValueError(
            f"targets must have shape {out_shape} (the model's output shape for these inputs), "
            f"got {tuple(targets.shape)}"
        )
    dims = loss.dims
    if dims is not None and {d % max(len(out_shape), 1) for d in dims} != set(range(len(out_shape))):
        raise ValueError(
            f"loss_fn reduces only dims {dims} of the output of shape {out_shape}: it does not return a scalar"
        )
    scale = loss.factor / (M * C) if loss.reduction == "mean" else loss.factor
    reshape_y = not (targets.dim() == 2 and targets.shape[1] == C)
    remember(plan.batch_layouts, key, (M, x.shape[1], C, scale, reshape_y), _LAYOUTS_PER_PLAN)
    return x, _target_rows(targets, M, C, reshape_y), scale


def remember(cache, key, value, limit):
    """cache[key] = value, evicting the oldest entry past `limit`; safe when threads share the cache
    (another thread may evict the same entry, or change the dict while its first key is read)."""
    if len(cache) >= limit:
        try:
            cache.pop(next(iter(cache)), None)
        except (StopIteration, RuntimeError):
            pass
    cache[key] = value


def _target_rows(targets, M, C, reshape_y):
    return targets.reshape(M, C) if reshape_y else targets


def pack_vectors(vectors, names, params):
    """The user's vectors as a list (named_parameters() order), whether they carry a leading batch
    dimension K, and a function that puts per-parameter results of the same form back in the user's
    format. The list holds [K, *p.shape] tensors when batched, else [*p.shape] ones (the native ops
    take either).

    Accepted: a dict name -> tensor, a list/tuple in named_parameters() order, or a flat tensor [P];
    each with an optional leading batch dimension K (dict/list entries [K, *shape], flat [K, P]).
    A dict or list/tuple as expected is recognised in C (`hessext._C.vector_items`); anything else
    takes the checks below, which name what is wrong."""
    native = _native.loaded()
    found = native.vector_items(vectors, names, params) if native is not None else None
    if found is not None:
        items, K = found
        return items, K > 0, restorer(vectors, names)
    ref = params[0]
    if isinstance(vectors, torch.Tensor):
        P = sum(p.numel() for p in params)
        if vectors.dim() not in (1, 2) or vectors.shape[-1] != P or vectors.numel() == 0:
            raise ValueError(
                f"vectors as a flat tensor must have shape [{P}] or [K, {P}] "
                f"(P = number of parameters), got {tuple(vectors.shape)}"
            )
        _check_like(vectors, ref, lambda _: "vectors", 0)
        batched = vectors.dim() == 2
        lead = tuple(vectors.shape[:1]) if batched else ()
        chunks = vectors.split([p.numel() for p in params], -1)
        entries = [c.reshape(lead + p.shape) for c, p in zip(chunks, params)]

        def restore(out):
            return torch.cat([o.reshape(lead + (-1,)) for o in out], -1)

        return entries, batched, restore
    if isinstance(vectors, Mapping):
        if len(vectors) != len(names) or any(n not in vectors for n in names):
            missing = [n for n in names if n not in vectors]
            extra = [n for n in vectors if n not in names]
            raise ValueError(
                f"vectors must have exactly the names of the parameters differentiated in {names} "
                f"(those in params=, else those that require grad, else all); "
                f"missing {missing}, unexpected {extra}"
            )
        items = [vectors[n] for n in names]

        def label(j):
            return f"vectors['{names[j]}']"
    elif isinstance(vectors, (list, tuple)):
        if len(vectors) != len(names):
            raise ValueError(
                f"vectors must hold {len(names)} tensors, one per parameter differentiated in "
                f"named_parameters() order {names}, got {len(vectors)}"
            )
        items = list(vectors)

        def label(j):
            return f"vectors[{j}]"
    else:
        raise TypeError(
            f"vectors must be a dict name -> tensor, a list/tuple of tensors or a flat tensor, "
            f"got {type(vectors).__name__}"
        )
    for j, t in enumerate(items):
        _check_like(t, ref, label, j)
    first, p0 = items[0], params[0]
    batched = first.shape != p0.shape
    if batched and (first.dim() != p0.dim() + 1 or first.shape[1:] != p0.shape or first.shape[0] == 0):
        raise ValueError(
            f"{label(0)} must have shape {tuple(p0.shape)} or [K, *{tuple(p0.shape)}] with K >= 1, "
            f"got {tuple(first.shape)}"
        )
    K = first.shape[0] if batched else 1
    for j, (t, p) in enumerate(zip(items, params)):
        if (t.shape[1:] if batched else t.shape) != p.shape or (batched and t.shape[0] != K):
            want = ((K,) if batched else ()) + tuple(p.shape)
            raise ValueError(
                f"{label(j)} must have shape {want} (like {label(0)}{', batched' if batched else ''}), "
                f"got {tuple(t.shape)}"
            )

    return items, batched, restorer(vectors, names)


def restorer(vectors, names):
    """Per-parameter results -> the container the user's vectors came in."""
    if isinstance(vectors, Mapping):
        return lambda out: dict(zip(names, out))
    if isinstance(vectors, tuple):
        return lambda out: type(vectors)(out)
    return list


def _check_like(t, ref, label, j):
    """t is a tensor with ref's dtype and device; label(j) names it in the error."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{label(j)} must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{label(j)} must be a dense tensor, got layout {t.layout}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{label(j)} must have dtype {ref.dtype} like the model's parameters, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{label(j)} must be on {ref.device} like the model's parameters, got {t.device}")
