"""The forward jets of a captured stack in torch ops: the model output u, its derivatives in the chosen
input features and its second derivatives in them (the Laplacian, or the unmixed or all second
derivatives), per sample, differentiable by autograd in the weights, biases and inputs. The recurrence
is csrc/jets.h's: per layer, with the first-order channels J [k, M, n] and the second-order channels
S [q, M, n], one per pair (i, j) (the Laplacian: one channel, the pairs (i, i) summed),

    z = a W^T + b,   Jz = J W^T,   Sz = S W^T                  (first layer: J = the unit rows e_i, S = 0)
    a' = phi(z),     J' = phi'(z) Jz,   S'_(i,j) = phi'(z) Sz_(i,j) + phi''(z) Jz_i Jz_j

and at the output u = z, its derivatives Jz and Sz. phi' and phi'' come from autograd through the
activation's own torch function (the branch autograd takes at a kink); autograd's reverse pass of
these ops is the reverse of the recurrence (phi''' included)."""

import torch


def check_dims(dims, d):
    """The input features a Laplacian sums over: all of them (None), or a list of distinct indices."""
    if dims is None:
        return list(range(d))
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
        raise TypeError(f"dims must be a list of input feature indices or None, got {dims!r}")
    dims = list(dims)
    if not dims or any(isinstance(i, bool) or not isinstance(i, int) for i in dims):
        raise TypeError(f"dims must be a non-empty list of int feature indices, got {dims!r}")
    if any(not -d <= i < d for i in dims):
        raise ValueError(f"dims must index the {d} input features (from {-d} to {d - 1}), got {dims}")
    dims = [i % d for i in dims]
    if len(set(dims)) != len(dims):
        raise ValueError(f"dims must not repeat a feature, got {dims}")
    return dims


def _derivatives(fn, z):
    """(phi(z), phi'(z), phi''(z)) elementwise, by reverse mode through phi (the gradient of sum(phi(z))
    is phi'(z) for an elementwise phi), keeping the graph where the outer backward differentiates it
    once more (the third derivative)."""
    needs_graph = torch.is_grad_enabled() and z.requires_grad
    with torch.enable_grad():
        t = z if needs_graph else z.detach().requires_grad_()
        value = fn(t)
        (first,) = torch.autograd.grad(value.sum(), t, create_graph=True)
        (second,) = torch.autograd.grad(first.sum(), t, create_graph=needs_graph, allow_unused=True)
    if second is None:  # phi'' is zero where phi' does not depend on z (ReLU, identity pieces)
        second = torch.zeros_like(z)
    if not needs_graph:
        value, first = value.detach(), first.detach()
    return value, first, second


def torch_functions(activations, act_params):
    """The torch function of each hidden layer's activation from an op's (activations, act_params)."""
    from hessext.capture import torch_function

    return [torch_function(kind, *act_params[2 * j : 2 * j + 2]) for j, kind in enumerate(activations)]


def pair_index(mode, k):
    """The (i, j) of each second-order channel of a jet mode over k features (csrc/jets.h jet_pairs) as
    two index lists; the Laplacian's single channel sums the pairs (i, i)."""
    if mode == 2:
        pairs = [(i, j) for i in range(k) for j in range(i, k)]
    else:
        pairs = [(i, i) for i in range(k)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def output_jet(fns, weights, biases, x, dims, mode=0):
    """The jet [1 + k + q, M, C] (u, its derivatives in the k input features `dims`, the q second-order
    channels of `mode`: 0, the Laplacian over them; 1, each d^2/dx_i^2; 2, each d^2/dx_i dx_j, i <= j) for
    rows x [M, n_0] of a stack with these weights, biases and hidden activations' torch functions (None:
    the identity): the layout of the native op hessext::output_jets."""
    first, second = pair_index(mode, len(dims))
    a, J, S = x, None, None
    for l, (W, b) in enumerate(zip(weights, biases)):
        z = a @ W.T if b is None else torch.addmm(b, a, W.T)
        if l == 0:
            Jz = W[:, dims].T.unsqueeze(1).expand(len(dims), x.shape[0], W.shape[0])
            Sz = None
        else:
            Jz, Sz = J @ W.T, S @ W.T
        fn = fns[l] if l < len(fns) else None
        if fn is None:
            q = 1 if mode == 0 else len(first)
            a, J, S = z, Jz, (Sz if Sz is not None else z.new_zeros((q,) + z.shape))
            continue
        a, d1, d2 = _derivatives(fn, z)
        J = d1 * Jz
        products = (Jz * Jz).sum(0, keepdim=True) if mode == 0 else Jz[first] * Jz[second]
        S = d2 * products + (d1 * Sz if Sz is not None else 0)
    return torch.cat([a[None], J, S])
