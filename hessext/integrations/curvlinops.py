"""curvlinops' linear operators on hessext's products.

`HessianLinearOperator` and `GGNLinearOperator` take curvlinops' own constructor (``model_func,
loss_func, params, data, *, progressbar, check_deterministic, num_data, block_sizes, batch_size_fn``)
and are its classes, so everything curvlinops builds on an operator (its trace and diagonal
estimators, its inverses, ``to_scipy``, sums and products of operators) runs on them; only the
mini-batch product (``_matmat_batch``) is hessext's: the K columns of a matrix in one call of
:func:`hessext.hvp` or :func:`hessext.ggn_vp` per batch (and per block of ``block_sizes``), native
where ``hessext.plan`` allows and torch.func otherwise, with the same answer. A ``model_func`` that
is not an ``nn.Module``, or inputs that are not a tensor, keep curvlinops' own product.
`HessianDiagonalLinearOperator` is the exact Hessian diagonal as an operator (curvlinops estimates
diagonals; this one is :func:`hessext.hessian_diag` over the data, computed once).

Needs curvlinops: ``pip install hessext[curvlinops]`` (curvlinops-for-pytorch)."""

from __future__ import annotations

try:
    import curvlinops
    from curvlinops._torch_base import CurvatureLinearOperator
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "hessext.integrations.curvlinops needs curvlinops: pip install hessext[curvlinops] "
        "(or pip install curvlinops-for-pytorch)"
    ) from exc

import torch
import torch.nn as nn

from hessext import curvature

__all__ = ["HessianLinearOperator", "GGNLinearOperator", "HessianDiagonalLinearOperator"]


def _names(model, params):
    """The name in model.named_parameters() of each tensor of params (curvlinops' list), by identity."""
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [j for j, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(
            f"params[{missing[0]}] is not a parameter of model_func: hessext's products need params to be "
            "tensors of model_func.named_parameters()"
        )
    return [names[id(p)] for p in params]


class _HessextProducts:
    """The mini-batch product on hessext: `_product` is hessext.hvp or hessext.ggn_vp."""

    _product = None

    def __init__(self, model_func, loss_func, params, data, *args, **kwargs):
        if isinstance(model_func, nn.Module):
            _names(model_func, params)  # a clear error before curvlinops' own passes over the data
        super().__init__(model_func, loss_func, params, data, *args, **kwargs)

    def _served(self, X):
        return isinstance(self._model_func, nn.Module) and isinstance(X, torch.Tensor)

    def _matmat_batch(self, X, y, M):
        if not self._served(X):
            return super()._matmat_batch(X, y, M)
        names = _names(self._model_func, self._params)
        out, start = [], 0
        for size in self._block_sizes:  # each block its own matrix: the products restricted to its parameters
            block = range(start, start + size)
            start += size
            params = {names[j]: self._params[j] for j in block}
            vectors = {names[j]: M[j].movedim(-1, 0) for j in block}
            result = type(self)._product(self._model_func, self._loss_func, X, y, vectors, params=params)
            out += [result[names[j]].movedim(0, -1) for j in block]
        return out


class HessianLinearOperator(_HessextProducts, curvlinops.HessianLinearOperator):
    """curvlinops' HessianLinearOperator (same constructor, same results) whose mini-batch products are
    hessext's K-vector Hessian-vector products."""

    _product = staticmethod(curvature.hvp)


class GGNLinearOperator(_HessextProducts, curvlinops.GGNLinearOperator):
    """curvlinops' GGNLinearOperator (same constructor, same results) whose mini-batch products are
    hessext's K-vector GGN-vector products."""

    _product = staticmethod(curvature.ggn_vp)


class HessianDiagonalLinearOperator(CurvatureLinearOperator):
    """The diagonal matrix of the Hessian's exact diagonal over the data, as a curvlinops operator
    (curvlinops' constructor; no blocks). The diagonal is :func:`hessext.hessian_diag` per batch,
    combined with curvlinops' normalisation, computed on the first product and kept; ``diagonal()``
    returns it in curvlinops' list format."""

    SELF_ADJOINT: bool = True

    def diagonal(self):
        """The exact Hessian diagonal over the data, one tensor per parameter."""
        if not hasattr(self, "_diagonal"):
            names = _names(self._model_func, self._params)
            total = [torch.zeros_like(p) for p in self._params]
            for X, y in self._loop_over_data(desc="diagonal"):
                params = dict(zip(names, self._params))
                diag = curvature.hessian_diag(self._model_func, self._loss_func, X, y, params=params)
                factor = self._get_normalization_factor(X, y)
                for t, n in zip(total, names):
                    t.add_(diag[n], alpha=factor)
            self._diagonal = total
        return self._diagonal

    def _matmat(self, M):
        return [d.unsqueeze(-1) * m for d, m in zip(self.diagonal(), M)]

    def _matmat_batch(self, X, y, M):  # the whole-data diagonal is kept; products use _matmat
        raise NotImplementedError("HessianDiagonalLinearOperator multiplies with the diagonal over all data")
