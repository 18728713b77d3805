"""laplace-torch curvature backends on hessext.

`HessextGGN` and `HessextHessian` are laplace-torch backends (``Laplace(model, likelihood,
hessian_structure=..., backend=HessextGGN)``), subclasses of its curvlinops backends:

- ``diag``: the exact GGN or Hessian diagonal of the batch (:func:`hessext.ggn_diag`,
  :func:`hessext.hessian_diag`), with no per-sample Jacobians materialised (laplace-torch's own GGN
  diagonal builds them: [N, C, P]);
- ``full``: the dense matrix from one call (:func:`hessext.hessian` with ``output="matrix"``, or the GGN's
  products with all P unit vectors at once), refused up front past the memory available;
- ``kron`` (GGN): the Kronecker factors of each Linear layer from :func:`hessext.kfac_factors` (one
  forward pass and C backward passes as matrix products; curvlinops' KFAC runs autograd with hooks);
- the Jacobians and gradients: laplace-torch's curvlinops backend's (Jacobians from torch.func).

Last-layer and subnetwork Laplace, inputs that are not a tensor, models the kernels do not serve, and
``kron`` with frozen parameters inside the stack or with keyword arguments for curvlinops keep the
curvlinops backend's computation (the same answers). Needs laplace-torch: ``pip install hessext[laplace]``."""

from __future__ import annotations

try:
    from laplace.curvature import CurvlinopsGGN, CurvlinopsHessian
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "hessext.integrations.laplace needs laplace-torch: pip install hessext[laplace] (or pip install laplace-torch)"
    ) from exc

import torch

from hessext import _memory, curvature, hessians, kfac
from hessext.plan import plan as _plan

__all__ = ["HessextGGN", "HessextHessian"]


class _HessextBackend:
    """diag and full of the batch on hessext, in laplace-torch's scaling (its `factor` times the
    curvature of its `lossfunc`, a sum over the batch), over the parameters that require grad."""

    _diag = None

    def _served(self, x):
        return isinstance(x, torch.Tensor) and not self.last_layer and self.subnetwork_indices is None

    def _loss(self, x, y):
        with torch.no_grad():
            return self.factor * self.lossfunc(self.model(x), y)

    def diag(self, x, y, **kwargs):
        if not self._served(x):
            return super().diag(x, y, **kwargs)
        d = type(self)._diag(self.model, self.lossfunc, x, y, params=self.params_dict)
        return self._loss(x, y), self.factor * torch.cat([d[n].reshape(-1) for n in self.params_dict])

    def full(self, x, y, **kwargs):
        if not self._served(x):
            return super().full(x, y, **kwargs)
        return self._loss(x, y), self.factor * self._dense(x, y)


class HessextGGN(_HessextBackend, CurvlinopsGGN):
    """laplace-torch's GGN backend with hessext's exact diagonal and dense GGN (``stochastic=True``, the
    Monte-Carlo Fisher, keeps curvlinops')."""

    _diag = staticmethod(curvature.ggn_diag)

    def _served(self, x):
        return super()._served(x) and not self.stochastic

    def _dense(self, x, y):
        P = sum(p.numel() for p in self.params_dict.values())
        p = next(iter(self.params_dict.values()))
        _memory.check(
            f"the dense GGN of {P} parameters", 3 * P * P * p.element_size(), x, None, "use hessian_structure='diag'"
        )
        eye = torch.eye(P, dtype=p.dtype, device=p.device)
        return curvature.ggn_vp(self.model, self.lossfunc, x, y, eye, params=self.params_dict)

    def kron(self, x, y, N, **kwargs):
        factors = self._kfac(x, y) if self._served(x) and not kwargs else None
        if factors is None:
            return super().kron(x, y, N, **kwargs)
        from laplace.utils import Kron

        kfacs = []
        for name, module in self.model.named_modules():  # laplace-torch's layout (CurvlinopsInterface)
            if name not in factors:
                continue
            A, B = factors[name]
            if module.bias is not None:
                kfacs += [[B, A * (len(y) / N)], [B]]
            elif B.numel() == A.numel() == 1:
                kfacs.append([B * A])
            else:
                kfacs.append([B, A * (len(y) / N)])
        with torch.no_grad():
            loss = self.factor * self.lossfunc(self.model(x), y)
        return loss, Kron(kfacs) * self.factor

    def _kfac(self, x, y):
        """hessext's factors by module name where every parameter of the stack is in self.params and the
        kernels serve the model, else None."""
        plan = _plan(self.model, self.lossfunc)
        if plan.ggn_reason() is not None:
            return None
        stack = {plan.param_names[j] for j in plan.weight_pos + [j for j in plan.bias_pos if j is not None]}
        if stack != set(self.params_dict):
            return None
        return kfac.kfac_factors(self.model, self.lossfunc, x, y)


class HessextHessian(_HessextBackend, CurvlinopsHessian):
    """laplace-torch's Hessian backend with hessext's exact diagonal and dense Hessian."""

    _diag = staticmethod(curvature.hessian_diag)

    def _dense(self, x, y):
        return hessians.hessian(self.model, self.lossfunc, x, y, params=self.params_dict, output="matrix")
