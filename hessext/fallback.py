"""torch.func implementations for any module and any loss: the fallback path, and the tests' reference.

HVPs are reverse-over-reverse: forward-over-reverse (`jvp(grad(f))`) raises "ZeroTensors are
immutable" when f uses F.mse_loss / nn.MSELoss (PyTorch bug 123996), while the Hessian is
symmetric, so the vjp of the gradient is the same product. Outside torch.func transforms, up to
LOOP_MAX_K vectors take plain autograd double backward, one backward pass per vector on one
retained graph of the gradient (on a LayerNorm [10,64,64,1] MLP, N=256, 2 threads: faster than
vmap up to K = 4, 5.3 against 5.7 ms; slower from K = 6, 7.5 against 7.2 ms), on the live module when
the parameters are its own (no functional_call); more vectors, or any call under a transform, take `vjp`
of `grad` vmapped over the vectors.
GGN products are J^T H_out J v: a jvp through the model, an HVP of the loss in its outputs, a vjp.
Exact diagonals are read off products with basis vectors, in chunks, with a progress bar."""

import contextlib
import random

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from hessext.inputs import transformed

# Past this many basis products an exact fallback diagonal is refused (hutchinson_diag estimates it).
MAX_BASIS_PRODUCTS = 200_000
LOOP_MAX_K = 4
CHUNK_BYTES = 64 * 2**20


@contextlib.contextmanager
def batch_statistics(model):
    """While the fallback differentiates, batch norm in training mode normalises with the batch's
    statistics, as its forward does, without updating the running statistics: torch.func cannot
    write them under a transform, and every product (every vector) would move them again."""
    changed = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def loss_function(model, loss_fn, inputs, targets):
    """params dict -> scalar loss of `model` on the batch."""

    def f(params):
        return loss_fn(functional_call(model, params, (inputs,)), targets)

    return f


def hvp(model, loss_fn, inputs, targets, params, vectors, keep_graph=False):
    """params: dict name -> tensor; vectors: dict name -> [K, *shape]. Returns dict name -> [K, *shape].
    keep_graph: the result stays differentiable in params, inputs, targets and vectors (torch.func)."""
    K = next(iter(vectors.values())).shape[0]
    tensors = list(params.values()) + list(vectors.values()) + [inputs, targets]
    if K <= LOOP_MAX_K and not keep_graph and not transformed(*tensors):
        return _double_backward(model, loss_fn, inputs, targets, params, vectors)
    f = loss_function(model, loss_fn, inputs, targets)
    with torch.enable_grad():
        _, vjp_fn = vjp(grad(f), params)
        return vmap(vjp_fn)(vectors)[0]


def _own(model, params):
    """The module's live parameters when `params` are exactly they (detached views of the same
    storage) and all require grad, else None."""
    own = dict(model.named_parameters())
    same = all(
        n in own
        and own[n].requires_grad
        and own[n].data_ptr() == p.data_ptr()
        and own[n].shape == p.shape
        and own[n].stride() == p.stride()
        for n, p in params.items()
    )
    return own if same and len(own) == len(params) else None


def _double_backward(model, loss_fn, inputs, targets, params, vectors):
    """K HVPs by autograd: the gradient with its graph once, then one backward pass of <grad, v> per vector."""
    names = list(params)
    own = _own(model, params)
    with torch.enable_grad():
        if own is not None:
            leaves = [own[n] for n in names]
            out = model(inputs)
        else:
            live = {n: p.detach().requires_grad_() for n, p in params.items()}
            leaves = [live[n] for n in names]
            out = functional_call(model, live, (inputs,))
        grads = torch.autograd.grad(loss_fn(out, targets), leaves, create_graph=True, allow_unused=True)
        used = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
        K = vectors[names[0]].shape[0]
        per_vector = [[] for _ in names]  # each parameter's K products, stacked at the end (no copies at K = 1)
        for k in range(K):
            hv = (
                torch.autograd.grad(
                    [grads[j] for j in used],
                    leaves,
                    [vectors[names[j]][k] for j in used],
                    retain_graph=k + 1 < K,
                    allow_unused=True,
                )
                if used
                else [None] * len(names)
            )
            for j, h in enumerate(hv):
                per_vector[j].append(h if h is not None else torch.zeros_like(params[names[j]]))
    return {n: rows[0].unsqueeze(0) if K == 1 else torch.stack(rows) for n, rows in zip(names, per_vector)}


def ggn_vp(model, loss_fn, inputs, targets, params, vectors, keep_graph=False):
    """GGN-vector products J^T H_out J v, same formats and keep_graph as hvp (torch.func throughout,
    so the result always stays differentiable where its inputs are). J v by forward mode; where a layer has
    no forward-mode derivative (float32 LSTM on the CPU: mkldnn_rnn_layer), by reverse over reverse:
    J v is the vjp, with cotangent v, of the linear map u -> J^T u."""

    def out_fn(p):
        return functional_call(model, p, (inputs,))

    with torch.enable_grad():
        out, out_vjp = vjp(out_fn, params)
        _, loss_hvp = vjp(grad(lambda o: loss_fn(o, targets)), out)

        def forward_mode(v):
            return jvp(out_fn, (params,), (v,))[1]

        def product(jacobian_times):
            return vmap(lambda v: out_vjp(loss_hvp(jacobian_times(v))[0])[0])(vectors)

        try:
            return product(forward_mode)
        except NotImplementedError as exc:
            if "forward AD" not in str(exc):
                raise
        _, transpose_vjp = vjp(lambda u: out_vjp(u)[0], torch.zeros_like(out))
        return product(lambda v: transpose_vjp(v)[0])


def graph_bytes(model, loss_fn, inputs, targets, params):
    """The bytes autograd saves for the backward pass of one loss evaluation (each storage once): the
    activations a product's graph holds, the unit of the fallback's memory per vector. 0 under a
    torch.func transform, which cannot record a plain autograd graph (chunks then count vectors only)."""
    if transformed(inputs, *params.values()):
        return 0
    sizes = {}

    def pack(t):
        storage = t.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
        return t

    live = {n: p.detach().requires_grad_() for n, p in params.items()}
    with torch.enable_grad(), batch_statistics(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = functional_call(model, live, (inputs,))
        if loss_fn is not None:
            loss_fn(out, targets)
    return sum(sizes.values())


# Bytes one vector of a vmapped HVP (reverse over reverse) holds, in units of graph_bytes: the
# gradient's graph and its vjp (3.1-4.6 measured on MLPs; docs/internals.md).
HVP_GRAPHS = 6


def _basis_products(product, params, desc, per_vector=0):
    """Products of the symmetric operator `product` (dict of [K, *shape] -> same) with every basis
    vector, chunked so that a chunk's basis vectors and the graphs of their products (`per_vector`
    bytes each) hold about CHUNK_BYTES: yields (j0, j1, rows [j1 - j0, P]); a tqdm progress bar when
    there are many chunks. Refused up front beyond MAX_BASIS_PRODUCTS parameters."""
    names = list(params)
    sizes = [params[n].numel() for n in names]
    P = sum(sizes)
    ref = params[names[0]]
    if P > MAX_BASIS_PRODUCTS:
        raise ValueError(
            f"an exact {desc} through torch.func needs {P} products (one per parameter) of about "
            f"{P * P * ref.element_size():,} bytes of basis vectors in total; refused "
            f"(limit {MAX_BASIS_PRODUCTS}). Use hessext.hutchinson_diag for an estimate."
        )
    chunk = max(1, min(P, CHUNK_BYTES // max(1, P * ref.element_size() + per_vector)))
    starts = range(0, P, chunk)
    if len(starts) > 8:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"{desc} (torch.func, {P} products)", unit="chunk")
    offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
    for j0 in starts:
        j1 = min(P, j0 + chunk)
        basis = torch.zeros(j1 - j0, P, dtype=ref.dtype, device=ref.device)
        basis[torch.arange(j1 - j0), torch.arange(j0, j1)] = 1
        vectors = {
            n: basis[:, offsets[k] : offsets[k + 1]].reshape((j1 - j0,) + params[n].shape) for k, n in enumerate(names)
        }
        out = product(vectors)
        yield j0, j1, torch.cat([out[n].reshape(j1 - j0, -1) for n in names], 1)


def basis_diag(product, params, desc, per_vector=0):
    """The diagonal of `product` (see _basis_products) as a dict name -> tensor."""
    names = list(params)
    sizes = [params[n].numel() for n in names]
    diag = _gather(
        ((j0, j1, torch.diagonal(rows, j0)) for j0, j1, rows in _basis_products(product, params, desc, per_vector)),
        sum(sizes),
    )
    return {n: part.reshape(params[n].shape) for n, part in zip(names, diag.split(sizes))}


def basis_matrix(product, params, desc, per_vector=0):
    """The dense matrix [P, P] of `product` (see _basis_products), rows in params' order."""
    return _gather(_basis_products(product, params, desc, per_vector), sum(p.numel() for p in params.values()))


def _gather(pieces, total):
    """The row blocks (j0, j1, rows) of a result with `total` rows, stacked: written into one
    preallocated result, or, where they carry a graph or torch.func batches them, joined out of place
    (differentiable and batchable). Keeping the many small blocks for a final join in the first case
    would fragment the heap while the products' large buffers come and go (resident memory grew by
    1.5 MB per product on a 4929-parameter MLP at N = 4000)."""
    out, kept = None, []
    for j0, j1, rows in pieces:
        if kept or rows.requires_grad or transformed(rows):
            kept.append(rows)
            continue
        if out is None:
            out = rows.new_empty((total,) + tuple(rows.shape[1:]))
        out[j0:j1] = rows
    return torch.cat(kept) if kept else out


def hessian_block(model, loss_fn, inputs, targets, call, group, per_vector):
    """Rows/columns `group` of the Hessian through torch.func HVPs with basis vectors, symmetrised."""
    p = call.fallback_params()  # the chosen parameters; the others are the module's own
    names = [call.plan.param_names[j] for j in group]
    sub = {n: p[n] for n in names}

    def product(vectors):
        full = {
            n: vectors[n]
            if n in vectors
            else torch.zeros((next(iter(vectors.values())).shape[0],) + t.shape, dtype=t.dtype, device=t.device)
            for n, t in p.items()
        }
        out = hvp(model, loss_fn, inputs, targets, p, full, keep_graph=call.traced)
        return {n: out[n] for n in names}

    H = basis_matrix(product, sub, "Hessian", per_vector)
    return (H + H.T) / 2 if call.traced else symmetrize_(H)


def symmetrize_(H, tile=256):
    """H <- (H + H^T) / 2 in place, tile by tile (no second matrix)."""
    n = H.shape[0]
    for r in range(0, n, tile):
        for c in range(r, n, tile):
            upper, lower = H[r : r + tile, c : c + tile], H[c : c + tile, r : r + tile]
            mean = (upper + lower.T) / 2
            upper.copy_(mean)
            lower.copy_(mean.T)
    return H


def probe_rows(N, like):
    """A 0/1 mask [N] of probe samples: sample 0 and a fixed pseudo-random half of the others."""
    rng = random.Random(N)
    mask = torch.tensor([j == 0 or rng.random() < 0.5 for j in range(N)])
    if N > 1 and bool(mask.all()):
        mask[-1] = False
    return mask.to(device=like.device)


def reaches_other_rows(apply, N, shape, like):
    """Whether `apply` (a linear map of [N, *shape] row blocks, such as an input HVP or the model's
    vjp) carries a block supported on the probe samples into any other sample's rows: the samples
    are coupled (a batch statistic in forward or loss). Exact zeros are expected otherwise. Under a
    torch.func transform the values cannot be read: the samples are taken as coupled (the exact path)."""
    if N == 1:
        return False
    if transformed(like):
        return True
    mask = probe_rows(N, like)
    g = torch.Generator().manual_seed(1)
    v = torch.randn((N,) + tuple(shape), generator=g, dtype=torch.float64).to(like)
    out = apply(v * mask.reshape((N,) + (1,) * len(shape)).to(like.dtype))
    return bool((out[~mask] != 0).any())


def directions(N, shape, features, like, coupled, start, count):
    """`count` basis directions in the inputs [count, N, *shape] from `start`, over the input `features`
    (k of them): each along one feature in every sample at once (k directions, independent samples),
    or along one feature of one sample (N k directions, coupled samples; direction q is feature
    features[q % k] of sample q // k)."""
    d, k = int(torch.Size(shape).numel()), len(features)
    if not coupled:
        eye = torch.eye(d, dtype=like.dtype, device=like.device)[features[start : start + count]]
        return eye.reshape((count, 1) + shape).expand((count, N) + shape)
    q = torch.arange(start, start + count)
    flat = (q // k) * d + torch.tensor(features)[q % k]
    basis = torch.zeros(count, N * d, dtype=like.dtype, device=like.device)
    basis[torch.arange(count), flat.to(like.device)] = 1
    return basis.reshape((count, N) + shape)


def chunks(N, d, k, es, coupled, per_vector):
    """(start, count) chunks of the directions (k of them, or N k where the samples are coupled), each
    chunk's basis, products and graphs (`per_vector` bytes a direction) within CHUNK_BYTES."""
    total = N * k if coupled else k
    step = max(1, CHUNK_BYTES // max(1, 2 * N * d * es + per_vector))
    return [(q, min(step, total - q)) for q in range(0, total, step)]


def input_hessian(model, loss_fn, inputs, targets, call, diagonal, per_vector):
    """HVPs in the inputs: d of them, each along one feature direction in every sample at once, when
    the samples are independent (each product then holds one column of every sample's block);
    N d of them, one feature of one sample each, when forward or the loss couples the samples."""
    N, shape = inputs.shape[0], inputs.shape[1:]
    d = inputs[0].numel()
    params = call.fallback_params()

    def f(x):
        return loss_fn(functional_call(model, params, (x,)), targets)

    x = call.result(inputs)
    with torch.enable_grad():
        _, vjp_fn = vjp(grad(f), x)
        coupled = reaches_other_rows(lambda v: vjp_fn(v)[0], N, shape, x)
        columns = []
        features = list(range(d))
        for start, count in chunks(N, d, d, x.element_size(), coupled, per_vector):
            out = vmap(vjp_fn)(directions(N, shape, features, x, coupled, start, count))[0].reshape(count, N, d)
            if coupled:  # direction q: column q % d of sample q // d's block
                out = out[
                    torch.arange(count, device=x.device), torch.arange(start, start + count, device=x.device) // d
                ]
            columns.append(out)
    cols = torch.cat(columns)  # [direction, N, d]: independent samples; [direction, d]: coupled
    cols = cols.reshape(N, d, d).transpose(1, 2) if coupled else cols.permute(1, 2, 0)  # [n, i, j] = H_n[i, j]
    H = call.result(cols)
    H = (H + H.transpose(1, 2)) / 2
    return torch.diagonal(H, dim1=1, dim2=2).contiguous() if diagonal else H


def jets(model, inputs, call, per_vector, features):
    """(u, grad u [N, *out, k], lap u) by forward-over-forward mode along one feature direction at a
    time: in every sample at once when the samples are independent; one feature of one sample each
    (that sample's output row kept) when forward couples the samples."""
    p = call.fallback_params()
    N, shape = inputs.shape[0], inputs.shape[1:]
    d, k = inputs[0].numel(), len(features)
    x = call.result(inputs)

    def out_fn(xx):
        return functional_call(model, p, (xx,))

    def both(v):  # (d/dt, d^2/dt^2) of model(x + t v) at t = 0
        return jvp(lambda xx: jvp(out_fn, (xx,), (v,))[1], (x,), (v,))

    with torch.enable_grad():
        out, vjp_out = vjp(out_fn, x)
    coupled = out.dim() == 0 or out.shape[0] != N or reaches_other_rows(lambda u: vjp_out(u)[0], N, out.shape[1:], x)
    if coupled and (out.dim() == 0 or out.shape[0] != N):
        raise ValueError(
            f"laplacian: the model's output of shape {tuple(out.shape)} has no row per sample "
            f"(inputs hold {N} samples); the Laplacian is taken per sample and output"
        )
    grads = out.new_zeros((k,) + tuple(out.shape))
    lap = torch.zeros_like(out)
    for start, count in chunks(N, d, k, x.element_size(), coupled, per_vector):
        first, second = vmap(both)(directions(N, shape, features, x, coupled, start, count))  # [count, N, *out]
        if coupled:  # direction q: feature q % k of sample q // k, whose output row it adds to
            q = torch.arange(start, start + count, device=x.device)
            rows, taken = q // k, torch.arange(count, device=x.device)
            lap = lap.index_add(0, rows, second[taken, rows])
            grads = grads.index_put((q % k, rows), first[taken, rows], accumulate=True)
        else:
            lap = lap + second.sum(0)
            grads = torch.cat([grads[:start], first, grads[start + count :]])
    grad = grads.permute(tuple(range(1, grads.dim())) + (0,))
    return call.result(out), call.result(grad), call.result(lap)
