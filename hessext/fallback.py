"""torch.func implementations for any module and any loss: the fallback path, and the tests' reference.

HVPs are reverse-over-reverse (`vjp` of `grad`, vmapped over the vectors): forward-over-reverse
(`jvp(grad(f))`) raises "ZeroTensors are immutable" when f uses F.mse_loss / nn.MSELoss (PyTorch
issue 123996), while the Hessian is symmetric, so the vjp of the gradient is the same product."""
import torch
from torch.func import functional_call, grad, vjp, vmap


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
