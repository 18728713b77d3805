"""The second-order quantities in the parameters: Hessian- and GGN-vector products, exact diagonals and
the Hutchinson estimate. Each function hands its call to hessext/_route.py (plan, checks, the native op or
torch.func, results shaped like the user's input)."""

from __future__ import annotations

import torch
import torch.nn as nn

from hessext import _route
from hessext._types import LossFn, Params, Tensor, Vectors
from hessext.compiled import unwrap


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    vectors: Vectors,
    *,
    params: Params = None,
    backend: str = "auto",
    create_graph: bool = False,
) -> Vectors:
    """Hessian-vector products of ``loss_fn(model(inputs), targets)`` in the parameters.

    Args:
        model: an ``nn.Module``; Linear/activation stacks run in the native kernels, any other
            model through torch.func (``hessext.plan(model, loss_fn).reason`` says why).
        loss_fn: a torch loss module or function of ``(output, targets)``.
        inputs: the batch, ``[N, ...]``.
        targets: the targets, as ``loss_fn`` takes them.
        vectors: a dict name -> tensor, a list or tuple in ``model.named_parameters()`` order, or a
            flat tensor ``[P]``; each may carry a leading batch dimension K (entries
            ``[K, *p.shape]``, flat ``[K, P]``) for K products at once.
        params: optional dict name -> tensor used instead of the module's parameters (a subset
            restricts the products to those parameters).
        backend: ``"auto"`` (native when the plan allows, else torch.func), ``"native"`` (a
            ``ValueError`` where not possible) or ``"torch.func"``.
        create_graph: as in ``torch.autograd.grad``: False returns detached results and leaves no
            ``.grad`` and no graph behind; True returns results differentiable in the parameters,
            inputs, targets and vectors (computed by torch.func).

    Returns:
        H v in the structure, shapes and dtype of ``vectors``.

    Raises:
        ValueError, TypeError: bad arguments, named, before any kernel runs.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        >>> v = [torch.randn_like(p) for p in model.parameters()]
        >>> Hv = hessext.hvp(model, nn.MSELoss(), x, y, v)
        >>> [tuple(t.shape) for t in Hv]
        [(8, 3), (8,), (1, 8), (1,)]
    """
    return _route.products("hvp", model, loss_fn, inputs, targets, vectors, params, backend, create_graph)


def ggn_vp(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    vectors: Vectors,
    *,
    params: Params = None,
    backend: str = "auto",
    create_graph: bool = False,
) -> Vectors:
    """Generalised Gauss-Newton-vector products ``J^T H_out J v``.

    J is the Jacobian of the model output in the parameters and H_out the Hessian of the loss in
    the output. Arguments and result as in :func:`hessext.hvp`.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
        >>> P = sum(p.numel() for p in model.parameters())
        >>> hessext.ggn_vp(model, nn.MSELoss(), x, y, torch.ones(4, P, dtype=torch.float64)).shape
        torch.Size([4, 50])
    """
    return _route.products("ggn_vp", model, loss_fn, inputs, targets, vectors, params, backend, create_graph)


def hessian_diag(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Params = None,
    backend: str = "auto",
    per_sample: bool = False,
    create_graph: bool = False,
) -> dict[str, Tensor]:
    """The exact diagonal of the Hessian of the loss in every parameter (not an estimate).

    It includes the activations' second-derivative (residual) terms. Native for the stacks the
    kernels serve; otherwise exact through P torch.func HVPs (refused beyond
    ``fallback.MAX_BASIS_PRODUCTS`` parameters).

    Args:
        model, loss_fn, inputs, targets, params, backend: as in :func:`hessext.hvp`.
        per_sample: True adds a leading dimension M (the rows of the batch): the diagonal of each
            sample's term of the loss (they sum to the full diagonal).
        create_graph: as in :func:`hessext.hvp` (True: differentiable, through torch.func).

    Returns:
        dict name -> tensor shaped like the parameter (``[M, *p.shape]`` with ``per_sample``).

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        >>> {k: tuple(v.shape) for k, v in hessext.hessian_diag(model, nn.MSELoss(), x, y).items()}
        {'0.weight': (8, 3), '0.bias': (8,), '2.weight': (1, 8), '2.bias': (1,)}
    """
    return _route.diag(False, model, loss_fn, inputs, targets, params, backend, per_sample, create_graph)


def ggn_diag(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Params = None,
    backend: str = "auto",
    per_sample: bool = False,
    create_graph: bool = False,
) -> dict[str, Tensor]:
    """The exact diagonal of the generalised Gauss-Newton matrix ``J^T H_out J``.

    Arguments and result as in :func:`hessext.hessian_diag`.
    """
    return _route.diag(True, model, loss_fn, inputs, targets, params, backend, per_sample, create_graph)


def hutchinson_diag(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    samples: int = 100,
    generator: torch.Generator | None = None,
    params: Params = None,
    backend: str = "auto",
    batch: int = 64,
) -> dict[str, Tensor]:
    """An unbiased estimate of the Hessian diagonal, for any model.

    The mean of ``v * (H v)`` over Rademacher vectors v (entries +1 or -1 with probability 1/2).

    Args:
        model, loss_fn, inputs, targets, params, backend: as in :func:`hessext.hvp`.
        samples: the number of vectors v.
        generator: a CPU ``torch.Generator`` for the vectors, for reproducibility.
        batch: vectors applied at once.

    Returns:
        dict name -> tensor shaped like the parameter.
    """
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int (vectors per product call), got {batch!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    model = unwrap(model)
    call = _route.route(model, loss_fn, inputs, targets, params, backend)
    names, tensors = call.names, call.selected
    ref = tensors[0]
    P = sum(t.numel() for t in tensors)
    total = torch.zeros(P, dtype=ref.dtype, device=ref.device)
    for start in range(0, samples, batch):
        k = min(batch, samples - start)
        v = rademacher((k, P), generator).to(dtype=ref.dtype, device=ref.device)
        total += (v * hvp(model, loss_fn, inputs, targets, v, params=params, backend=backend)).sum(0)
    total /= samples
    sizes = [t.numel() for t in tensors]
    return {n: c.reshape(t.shape) for n, c, t in zip(names, total.split(sizes), tensors)}


def rademacher(shape, generator=None):
    """A float tensor of independent +1/-1 entries, each with probability 1/2."""
    return torch.randint(0, 2, shape, generator=generator).mul_(2).sub_(1).to(torch.get_default_dtype())
