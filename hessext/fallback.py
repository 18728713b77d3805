"""torch.func implementations for any module and any loss: the fallback path, and the tests' reference.

HVPs are reverse-over-reverse (`vjp` of `grad`, vmapped over the vectors): forward-over-reverse
(`jvp(grad(f))`) raises "ZeroTensors are immutable" when f uses F.mse_loss / nn.MSELoss (PyTorch
issue 123996), while the Hessian is symmetric, so the vjp of the gradient is the same product.
GGN products are J^T H_out J v: a jvp through the model, an HVP of the loss in its outputs, a vjp.
Exact diagonals are read off products with basis vectors, in chunks, with a progress bar."""
import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

# Past this many basis products an exact fallback diagonal is refused (hutchinson_diag estimates it).
MAX_BASIS_PRODUCTS = 200_000
CHUNK_BYTES = 64 * 2**20


def loss_function(model, loss_fn, inputs, targets):
    """params dict -> scalar loss of `model` on the batch."""

    def f(params):
        return loss_fn(functional_call(model, params, (inputs,)), targets)

    return f


def hvp(model, loss_fn, inputs, targets, params, vectors):
    """params: dict name -> tensor; vectors: dict name -> [K, *shape]. Returns dict name -> [K, *shape]."""
    f = loss_function(model, loss_fn, inputs, targets)
    with torch.enable_grad():
        _, vjp_fn = vjp(grad(f), params)
        return vmap(vjp_fn)(vectors)[0]


def ggn_vp(model, loss_fn, inputs, targets, params, vectors):
    """GGN-vector products J^T H_out J v, same formats as hvp."""

    def out_fn(p):
        return functional_call(model, p, (inputs,))

    with torch.enable_grad():
        out, out_vjp = vjp(out_fn, params)
        _, loss_hvp = vjp(grad(lambda o: loss_fn(o, targets)), out)

        def one(v):
            Jv = jvp(out_fn, (params,), (v,))[1]
            return out_vjp(loss_hvp(Jv)[0])[0]

        return vmap(one)(vectors)


def basis_diag(product, params, desc):
    """The diagonal of the symmetric operator `product` (dict of [K, *shape] -> same) from products
    with basis vectors, chunked; a tqdm progress bar when there are many chunks."""
    names = list(params)
    sizes = [params[n].numel() for n in names]
    P = sum(sizes)
    if P > MAX_BASIS_PRODUCTS:
        raise ValueError(f"an exact {desc} through torch.func needs {P} products (one per parameter) of about "
                         f"{P * P * params[names[0]].element_size():,} bytes of basis vectors in total; refused "
                         f"(limit {MAX_BASIS_PRODUCTS}). Use hessext.hutchinson_diag for an estimate.")
    ref = params[names[0]]
    chunk = max(1, min(P, CHUNK_BYTES // max(1, P * ref.element_size())))
    starts = range(0, P, chunk)
    if len(starts) > 8:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"{desc} (torch.func, {P} products)", unit="chunk")
    diag = torch.empty(P, dtype=ref.dtype, device=ref.device)
    offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
    for j0 in starts:
        j1 = min(P, j0 + chunk)
        basis = torch.zeros(j1 - j0, P, dtype=ref.dtype, device=ref.device)
        basis[torch.arange(j1 - j0), torch.arange(j0, j1)] = 1
        vectors = {n: basis[:, offsets[k]:offsets[k + 1]].reshape((j1 - j0,) + params[n].shape)
                   for k, n in enumerate(names)}
        out = product(vectors)
        flat = torch.cat([out[n].reshape(j1 - j0, -1) for n in names], 1)
        diag[j0:j1] = flat[torch.arange(j1 - j0), torch.arange(j0, j1)]
    return {n: diag[offsets[k]:offsets[k + 1]].reshape(params[n].shape) for k, n in enumerate(names)}
