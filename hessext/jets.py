"""The forward Laplacian of a captured stack in torch ops: the model output u, its gradient in the
chosen input features and its Laplacian over them, per sample, differentiable by autograd in the
weights, biases and inputs. The recurrence is csrc/jets.h's, restricted to the Laplacian's channels:
per layer, with the gradient channels J [k, M, n] and the Laplacian channel S [M, n],

    z = a W^T + b,   Jz = J W^T,   Sz = S W^T                  (first layer: J = the unit rows e_i, S = 0)
    a' = phi(z),     J' = phi'(z) Jz,   S' = phi'(z) Sz + phi''(z) sum_i Jz_i^2

and at the output u = z, grad u = Jz, lap u = Sz. phi' and phi'' come from autograd through the
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
        first, = torch.autograd.grad(value.sum(), t, create_graph=True)
        second, = torch.autograd.grad(first.sum(), t, create_graph=needs_graph, allow_unused=True)
    if second is None:  # phi'' is zero where phi' does not depend on z (ReLU, identity pieces)
        second = torch.zeros_like(z)
    if not needs_graph:
        value, first = value.detach(), first.detach()
    return value, first, second


def torch_functions(activations, act_params):
    """The torch function of each hidden layer's activation from an op's (activations, act_params)."""
    from hessext.capture import torch_function

    return [torch_function(kind, *act_params[2 * j:2 * j + 2]) for j, kind in enumerate(activations)]


def output_jet(fns, weights, biases, x, dims):
    """The jet [2 + k, M, C] (u, its derivatives in the k input features `dims`, lap u over them) for
    rows x [M, n_0] of a stack with these weights, biases and hidden activations' torch functions (None:
    the identity): the layout of the native op hessext::laplacian_jets."""
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
            a, J, S = z, Jz, (Sz if Sz is not None else torch.zeros_like(z))
            continue
        a, d1, d2 = _derivatives(fn, z)
        J = d1 * Jz
        S = d2 * (Jz * Jz).sum(0) + (d1 * Sz if Sz is not None else 0)
    return torch.cat([a[None], J, S[None]])
