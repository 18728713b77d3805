"""`HessianOperator`: the Hessian (or GGN) of a loss over a whole data set as a linear operator,
P x P, applied K columns at a time by one hessext call per batch.

Over several batches the operator is the curvature of the loss on all of the data: for a
mean-reduced loss the batches' curvatures weighted by what each batch's mean divides by (its
elements for a regression loss, its counted targets for cross-entropy and NLL: ignore_index and
class weights included; the leading dim of the inputs for a loss hessext does not know, or what
`batch_size_fn` says), which equals one call on the concatenated data; for a sum-reduced loss their sum.
With `process_group`, each process passes its own shard and every product is all-reduced (the K
products and the sample count in one tensor), so that every process holds the operator of the
union of the shards."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable

import torch
import torch.nn as nn

from hessext import capture, curvature
from hessext._types import LossFn, Params
from hessext.inputs import check_params
from hessext.plan import plan as make_plan

CURVATURES = ("hessian", "ggn")


def _is_pair(data):
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
    )


class HessianOperator:
    """H = HessianOperator(model, loss_fn, data): `H @ v` for v [P] or [P, K] (columns), `H.shape`,
    `H.dtype`, `H.device`, `H.to_scipy()`.

    data: an (inputs, targets) pair, or a re-iterable collection of pairs such as a list or a
    DataLoader (iterated afresh for every product; a one-shot iterator is refused). curvature:
    "hessian" or "ggn". P and the vector layout are the parameters that require grad (all of them
    when none does), in `model.named_parameters()` order, or those named in params: a dict name ->
    tensor used instead of the module's parameters. reduction: "mean" or "sum", needed
    only when hessext cannot read it from `loss_fn` and `data` has several batches.
    batch_size_fn: (inputs, targets) -> the number a mean-reduced loss divides by on that batch
    (default: read from the loss, see above). process_group: a torch.distributed group (or `True`
    for the default one): every product is summed over the processes of the group. progress: a
    tqdm bar over the batches of each product. check_deterministic: apply the operator twice to one
    random vector when it is built and raise if the products differ (active dropout, a data
    pipeline that changes between passes), as curvlinops does."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data,
        *,
        curvature: str = "hessian",
        params: Params = None,
        backend: str = "auto",
        process_group=None,
        progress: bool = False,
        reduction: str | None = None,
        batch_size_fn: Callable | None = None,
        check_deterministic: bool = True,
    ):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if reduction not in (None, "mean", "sum"):
            raise ValueError(f"reduction must be 'mean', 'sum' or None (read from loss_fn), got {reduction!r}")
        if not _is_pair(data) and not isinstance(data, Iterable):
            raise TypeError(
                "data must be an (inputs, targets) pair of tensors or an iterable of such pairs "
                f"(a DataLoader), got {type(data).__name__}"
            )
        if not _is_pair(data) and iter(data) is data:
            raise TypeError(
                f"data is a one-shot iterator ({type(data).__name__}), spent after the first product, "
                "while every product iterates the data afresh; pass a list of (inputs, targets) "
                "pairs or a DataLoader"
            )
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError(f"batch_size_fn must be a callable (inputs, targets) -> number, got {batch_size_fn!r}")
        if not isinstance(check_deterministic, bool):
            raise TypeError(f"check_deterministic must be True or False, got {check_deterministic!r}")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.curvature, self.backend, self.progress = curvature, backend, progress
        self.params = params
        tensors, sel = check_params(make_plan(model, loss_fn), params)
        P = sum(tensors[j].numel() for j in sel)  # the parameters that require grad, or those in `params`
        self.shape = (P, P)
        self.dtype, self.device = tensors[0].dtype, tensors[0].device
        self._reduction = reduction or _loss_reduction(loss_fn)
        if process_group is not None and self._reduction is None:
            raise ValueError(_NO_REDUCTION + "combine the processes' shards")
        self._group = process_group
        self._product = curvature_products[curvature]
        self._count = batch_size_fn or _mean_count(loss_fn)
        if check_deterministic:
            self._check_deterministic()

    def __repr__(self):
        return (
            f"HessianOperator(curvature={self.curvature!r}, shape={self.shape}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    @property
    def reduction(self):
        return self._reduction

    def batches(self):
        """The data's (inputs, targets) pairs, afresh (each checked to be a pair of tensors)."""
        if _is_pair(self.data):
            yield tuple(self.data)
            return
        for j, batch in enumerate(self.data):
            if not _is_pair(batch):
                what = (
                    f"a {type(batch).__name__} of {len(batch)}"
                    if isinstance(batch, (tuple, list))
                    else f"a {type(batch).__name__}"
                )
                raise TypeError(
                    f"data's batches must be (inputs, targets) pairs of tensors; batch {j} is {what} "
                    "(map dicts or (inputs, targets, weights) triples to pairs first, e.g. in a "
                    "DataLoader's collate_fn)"
                )
            yield batch

    def _check_deterministic(self):
        g = torch.Generator().manual_seed(0)
        v = torch.randn(self.shape[0], generator=g, dtype=torch.float64).to(self.dtype).to(self.device)
        first, second = self.matmul(v), self.matmul(v)
        diff, size = float((first - second).abs().max()), float(first.abs().max())
        if not diff <= torch.finfo(self.dtype).eps ** 0.5 * max(size, torch.finfo(self.dtype).tiny):
            raise ValueError(
                f"the operator is not deterministic: two products with the same vector differ by "
                f"{diff:.3g} (largest entry {size:.3g}). Typical causes: dropout or batch norm in "
                "training mode (call model.eval()), a shuffling or augmenting DataLoader (shuffle=False, "
                "drop_last=False), random targets. check_deterministic=False skips this check"
            )

    def matmul(self, v):
        """H v for v [P] or [P, K] (K columns; one call per batch with all of them)."""
        V = columns(self, v)
        total, count, batches = torch.zeros_like(V), 0, 0
        for inputs, targets in self._bar(self.batches()):
            if batches == 1 and self._reduction is None:  # before the second batch's product
                raise ValueError(_NO_REDUCTION + "combine several batches")
            n = self._count(inputs, targets) if self._reduction == "mean" else 1
            out = self._product(self.model, self.loss_fn, inputs, targets, V, params=self.params, backend=self.backend)
            total.add_(out, alpha=n if self._reduction == "mean" else 1)
            count += n
            batches += 1
        if self._group is not None:
            total, count = self._all_reduce(total, count)
        elif batches == 0:
            raise ValueError("data holds no batches: the operator of no data is undefined")
        if self._reduction == "mean":
            total.div_(count)
        return total[0] if v.dim() == 1 else total.t()

    __matmul__ = matmul

    def _bar(self, batches):
        if not self.progress:
            return batches
        from tqdm.auto import tqdm

        return tqdm(batches, desc=f"{self.curvature} product", unit="batch", leave=False)

    def _all_reduce(self, total, count):
        import torch.distributed as dist

        group = None if self._group is True else self._group
        buf = torch.cat([total.reshape(-1), total.new_tensor([float(count)])])
        dist.all_reduce(buf, group=group)
        count = buf[-1].item()
        if count == 0:
            raise ValueError("no process holds any data: the operator of no data is undefined")
        return buf[:-1].view_as(total), count

    def to_scipy(self):
        """A scipy.sparse.linalg.LinearOperator (float64 numpy in and out; products in the operator's
        dtype on its device)."""
        return scipy_operator(self)


def columns(op, v):
    """v [P] or [P, K] for an operator of shape (P, P), dtype and device, checked, as hessext's batched
    layout [K, P]."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a tensor of shape [{op.shape[0]}] or [{op.shape[0]}, K], got {type(v).__name__}")
    P = op.shape[0]
    if v.dim() not in (1, 2) or v.shape[0] != P or v.numel() == 0:
        raise ValueError(f"v must have shape [{P}] or [{P}, K] (columns), got {tuple(v.shape)}")
    if v.dtype != op.dtype or v.device != op.device:
        raise TypeError(f"v must be {op.dtype} on {op.device} like the operator, got {v.dtype} on {v.device}")
    return (v.unsqueeze(0) if v.dim() == 1 else v.t()).contiguous()


def scipy_operator(op):
    """op as a scipy.sparse.linalg.LinearOperator (float64 numpy in and out; products in op's dtype on
    its device)."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator

    def apply(x):
        t = torch.as_tensor(np.asarray(x, dtype=np.float64)).to(dtype=op.dtype, device=op.device)
        return op.matmul(t).detach().to("cpu", torch.float64).numpy()

    return LinearOperator(op.shape, matvec=apply, matmat=apply, rmatvec=apply, rmatmat=apply, dtype=np.float64)


_ELEMENTWISE = (
    "MSELoss",
    "L1Loss",
    "HuberLoss",
    "SmoothL1Loss",
    "BCELoss",
    "BCEWithLogitsLoss",
    "SoftMarginLoss",
    "PoissonNLLLoss",
    "GaussianNLLLoss",
    "KLDivLoss",
)


def _mean_count(loss_fn):
    """(inputs, targets) -> what loss_fn's mean divides by on that batch: the counted targets of
    cross-entropy and NLL (those not ignore_index, each weighted by its class weight), the elements of
    a regression loss, else the leading dim of the inputs."""
    try:
        captured = capture.capture_loss(loss_fn)
    except capture.Unsupported:
        captured = None
    name = type(loss_fn).__name__ if type(loss_fn).__module__ == "torch.nn.modules.loss" else None
    if name in ("CrossEntropyLoss", "NLLLoss") or (captured is not None and captured.classes):

        def classes(inputs, targets):
            if targets.is_floating_point():  # class probabilities: one row per sample (and position)
                return targets.numel() // max(1, targets.shape[1] if targets.dim() > 1 else targets.shape[0])
            ignore = getattr(loss_fn, "ignore_index", captured.ignore_index if captured is not None else -100)
            kept = targets != ignore
            weight = getattr(loss_fn, "weight", None)
            return float(weight[targets[kept]].sum()) if weight is not None else int(kept.sum())

        return classes
    batchmean = name == "KLDivLoss" and loss_fn.reduction == "batchmean"
    if captured is not None or (name in _ELEMENTWISE and not batchmean):
        return lambda inputs, targets: targets.numel()
    return lambda inputs, targets: int(inputs.shape[0]) if inputs.dim() else 1


_NO_REDUCTION = (
    "loss_fn's reduction could not be read (hessext does not recognise the loss); pass "
    "reduction='mean' or 'sum' to HessianOperator to "
)


def _loss_reduction(loss_fn):
    """ "mean" or "sum" as hessext reads it from the loss, or None where it cannot."""
    try:
        return capture.capture_loss(loss_fn).reduction
    except capture.Unsupported:
        torch_loss = type(loss_fn).__module__ == "torch.nn.modules.loss"
        reduction = getattr(loss_fn, "reduction", None) if torch_loss else None
        return reduction if reduction in ("mean", "sum") else None


curvature_products = {"hessian": curvature.hvp, "ggn": curvature.ggn_vp}
