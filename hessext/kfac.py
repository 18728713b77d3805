"""The Kronecker factors of the GGN's KFAC approximation for the Linear layers of a stack.

For layer l with inputs a_{l-1} (the rows the Linear sees, [M, n_in]) and pre-activations z_l, the
GGN block of its weight is approximated by B_l (x) A_l with

    A_l = (1/M) sum_m a_{l-1,m} a_{l-1,m}^T                  (the input covariance)
    B_l = sum_m J_{l,m}^T H_m J_{l,m}                         (the output-side factor)

where J_{l,m} = d f_m / d z_l [C, n_out] is sample m's Jacobian of the model's output rows f_m
[C] in z_l, and H_m = d^2 L / d f_m^2 [C, C] the loss's Hessian block of that row (the loss is a sum
over rows, so the blocks off the diagonal are zero). These are the factors curvlinops'
`KFACLinearOperator` computes with `fisher_type=TYPE2`, one batch as the data, and weight and bias
apart (the bias's block is B_l), which laplace-torch's KFAC (`hessian_structure="kron"`) takes; the
mean over samples sits in A_l, the loss's reduction in H_m. One forward pass and C backward passes
of the C output rows, all as matrix products:

    forward:   z_l = a_{l-1} W_l^T + b_l,  a_l = phi_l(z_l),  d_l = phi_l'(z_l)
    backward:  J_L = I_C,  J_l = (J_{l+1} W_{l+1}) * d_l       ([M, C, n_l], d_l broadcast over C)
    factors:   A_l = a_{l-1}^T a_{l-1} / M,  B_l = sum over (m, c) of J_l^T (H J_l)
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from hessext import _route, inputs, jets

__all__ = ["kfac_factors"]


def kfac_factors(model, loss_fn, inputs_, targets) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """The GGN's KFAC factors (A, B) of each Linear layer of the batch, by the Linear module's name.

    Args:
        model: a stack hessext's kernels serve (Linear layers and elementwise activations; see
            ``hessext.plan(model, loss_fn).reason`` otherwise).
        loss_fn: the loss, a sum or mean over the output rows (MSE, cross-entropy, ...), on the model's
            output.
        inputs_: the batch's inputs, ``[M, n_0]`` (or what the model's leading Flatten takes).
        targets: the batch's targets.

    Returns:
        ``{name: (A [n_in, n_in], B [n_out, n_out])}``: the weight's block is approximated by
        ``kron(B, A)`` (row-major ``W.reshape(-1)``), the bias's (if any) by ``B``. The module docstring
        has the definitions; they equal curvlinops' ``KFACLinearOperator`` (``fisher_type=TYPE2``, the
        batch as the data, ``separate_weight_and_bias=True``).

    Raises:
        ValueError: where the kernels do not serve the model and loss (the reason says why), or the
            model ends in LogSoftmax (the GGN is then taken at the logits: use CrossEntropyLoss), or the
            output has more than one row per sample.

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        >>> A, B = hessext.kfac_factors(model, nn.MSELoss(), x, y)["0"]
        >>> A.shape, B.shape
        (torch.Size([3, 3]), torch.Size([5, 5]))
    """
    call = _route.route(model, loss_fn, inputs_, targets, None, "auto")
    plan = call.plan
    why = plan.ggn_reason() if call.native else call.why
    if why is not None:
        raise ValueError(f"hessext.kfac_factors needs a stack the kernels serve: {why}")
    x, out_shape, C = inputs.native_inputs(plan, inputs_, call.tensors)
    if x.shape[0] != inputs_.shape[0]:
        raise ValueError(
            f"hessext.kfac_factors takes one output row per sample; these inputs of shape {tuple(inputs_.shape)} "
            f"give {x.shape[0]} rows"
        )
    weights = [call.tensors[j].detach() for j in plan.weight_pos]
    biases = [call.tensors[j].detach() if j is not None else None for j in plan.bias_pos]
    fns = jets.torch_functions(*plan.spec[:2])
    x = x.detach()
    rows, slopes, a = [], [], x
    with torch.no_grad():
        for l, (W, b) in enumerate(zip(weights, biases)):
            rows.append(a)
            z = a @ W.T if b is None else torch.addmm(b, a, W.T)
            if l < len(weights) - 1:  # phi'' from jets._derivatives is not needed here
                a, d = (z, torch.ones_like(z)) if fns[l] is None else jets._derivatives(fns[l], z)[:2]
                slopes.append(d)
    _, H = _route.loss_head(plan, loss_fn, z, targets, out_shape)
    H = H.detach()
    M = x.shape[0]
    J = torch.eye(C, dtype=x.dtype, device=x.device).expand(M, C, C)  # d f / d z_L
    factors = []
    with torch.no_grad():
        for l in range(len(weights) - 1, -1, -1):
            if l < len(weights) - 1:
                J = (J @ weights[l + 1]) * slopes[l].unsqueeze(1)
            n = J.shape[-1]
            B = J.reshape(M * C, n).T @ (H @ J).reshape(M * C, n)
            factors.append(((rows[l].T @ rows[l]) / M, (B + B.T) / 2))
    factors.reverse()
    names = [plan.param_names[j].rsplit(".", 1)[0] if "." in plan.param_names[j] else "" for j in plan.weight_pos]
    return dict(zip(names, factors))
