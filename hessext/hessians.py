"""Full Hessians: with respect to the weights (dense or block-diagonal, dict or matrix) and to the
inputs (per-sample input Hessians of the loss, Laplacians of the model output). Each function hands
its call to hessext/_route.py (plan, checks and a memory estimate before allocating, the native op or
torch.func, results shaped like the user's parameters or inputs)."""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from hessext import _route
from hessext._types import LossFn, Params, Tensor


def hessian(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Params = None,
    backend: str = "auto",
    output: str = "dict",
    blocks: str = "full",
    max_bytes: int | None = None,
    create_graph: bool = False,
) -> dict | Tensor:
    """The Hessian of the loss in the parameters, exact and exactly symmetric.

    The bytes are estimated before allocating; beyond ``max_bytes`` the call is refused with the
    figure and a suggestion.

    Args:
        model, loss_fn, inputs, targets, params, backend: as in :func:`hessext.hvp`.
        output: ``"dict"``, the torch.func layout (``H[name1][name2].shape == p1.shape + p2.shape``),
            or ``"matrix"``, a dense ``[P, P]`` tensor in ``named_parameters()`` flatten order.
        blocks: ``"full"``, or ``"layer"`` for the per-layer diagonal blocks only (the dict holds
            the same-layer pairs; the matrix form is a list of one ``[P_l, P_l]`` per layer).
        max_bytes: the memory the call may take (default: the memory available).
        create_graph: as in :func:`hessext.hvp` (True: differentiable, through torch.func).

    Returns:
        The Hessian in the layout ``output`` and ``blocks`` ask for.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        >>> x, y = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> H = hessext.hessian(model, nn.MSELoss(), x, y, output="matrix")
        >>> H.shape, bool((H == H.T).all())
        (torch.Size([17, 17]), True)
    """
    return _route.hessian(model, loss_fn, inputs, targets, params, backend, output, blocks, max_bytes, create_graph)


def input_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    diagonal: bool = False,
    params: Params = None,
    backend: str = "auto",
    max_bytes: int | None = None,
) -> Tensor:
    """For each sample, the Hessian of the loss in that sample's input row.

    The diagonal blocks of torch.func's ``[N, d, N, d]`` (the others are zero). Differentiable like
    the model's output: in grad mode, when a parameter, the inputs or the targets require grad, the
    result carries their gradient (for the stacks the kernels serve, through the reverse pass of
    their jets on the CPU; else through torch.func); otherwise the kernels compute it, detached.

    Args:
        model, loss_fn, inputs, targets, params, backend: as in :func:`hessext.hvp`; ``inputs`` is
            ``[N, *features]`` with d features per sample.
        diagonal: True returns only the diagonal of each Hessian.
        max_bytes: the memory the call may take (default: the memory available).

    Returns:
        ``[N, d, d]``, or ``[N, d]`` with ``diagonal=True``.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3), nn.LogSoftmax(dim=-1))
        >>> x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
        >>> with torch.no_grad():
        ...     hessext.input_hessian(model, nn.NLLLoss(), x, y).shape
        torch.Size([10, 5, 5])
    """
    return _route.input_hessian(model, loss_fn, inputs, targets, diagonal, params, backend, max_bytes)


def laplacian(
    model: nn.Module,
    inputs: Tensor,
    *,
    dims: Sequence[int] | None = None,
    params: Params = None,
    backend: str = "auto",
    max_bytes: int | None = None,
) -> Tensor:
    """For each sample and output, the Laplacian of the model output in that sample's inputs.

    The sum of the unmixed second derivatives over the input features ``dims``, from one
    forward-mode pass. Differentiable like the model's output: in grad mode, when a parameter or the
    inputs require grad, the result carries their gradient, so a physics-informed loss trains
    through it (on the CPU the kernels' reverse pass; on CUDA the same recurrence in torch ops;
    other models through torch.func). Under ``torch.no_grad()``, or with frozen parameters and plain
    inputs, the kernels compute it detached and keep nothing.

    Args:
        model: an ``nn.Module`` of inputs ``[N, *features]``.
        inputs: the points, ``[N, *features]``.
        dims: the input features the sum runs over (a list of indices, e.g. the space coordinates
            and not time), or None for all.
        params, backend: as in :func:`hessext.hvp`.
        max_bytes: the memory the call may take (default: the memory available); the bytes are
            estimated first.

    Returns:
        A tensor shaped like the model output, ``[N, C]``.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        >>> x = torch.rand(32, 2, dtype=torch.float64)
        >>> loss = (hessext.laplacian(model, x) ** 2).mean()   # a PDE residual's loss
        >>> loss.backward()                                      # trains through the Laplacian
        >>> model[0].weight.grad.shape
        torch.Size([16, 2])
    """
    return _route.input_jets("laplacian", model, inputs, dims, params, backend, max_bytes)


def value_gradient_laplacian(
    model: nn.Module,
    inputs: Tensor,
    *,
    dims: Sequence[int] | None = None,
    params: Params = None,
    backend: str = "auto",
    max_bytes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The model output, its input gradient and its Laplacian, from one forward-mode pass.

    The three a PDE residual with first-order terms (heat, advection, Burgers) needs.
    Differentiable as :func:`hessext.laplacian` is; detached under ``torch.no_grad()``.

    Args:
        model, inputs, params, backend, max_bytes: as in :func:`hessext.laplacian`.
        dims: the k input features of the gradient and the Laplacian (None: all d).

    Returns:
        ``(u, grad_u, lap_u)``: ``u`` shaped like the output ``[N, *out]``, ``grad_u``
        ``[N, *out, k]`` and ``lap_u`` ``[N, *out]``.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        >>> x = torch.rand(32, 3, dtype=torch.float64)       # (t, x, y): time first
        >>> u, grad_u, lap_u = hessext.value_gradient_laplacian(model, x, dims=[1, 2])
        >>> tuple(u.shape), tuple(grad_u.shape), tuple(lap_u.shape)
        ((32, 1), (32, 1, 2), (32, 1))
    """
    return _route.input_jets("value_gradient_laplacian", model, inputs, dims, params, backend, max_bytes)
