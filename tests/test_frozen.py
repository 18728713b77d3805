"""Frozen parameters and parameter subsets: the quantities cover the parameters that require grad, as
torch.optim trains them (all of them when none does), or those named in `params=`. Each result equals
the matching block of the full quantity computed with every parameter (float64, 1e-10 relative), on
the native path and on torch.func's, which then takes products only in the chosen parameters."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hessext
from cases import assert_close


def model_of(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, 2)).double()


def full_hessian(model, x, y):
    """The dense Hessian in every parameter (each unfrozen for the reference)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    try:
        return hessext.hessian(model, F.mse_loss, x, y, output="matrix", backend="torch.func")
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


@pytest.mark.parametrize("act", [nn.Tanh, nn.Softsign], ids=["native", "torch.func"])
def test_frozen_first_layer(act):
    model = model_of(act)
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    H = full_hessian(model, x, y)
    model[0].requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    keep = torch.cat([torch.full((p.numel(),), p.requires_grad) for p in model.parameters()])
    Hk = H[keep][:, keep]
    assert hessext.plan(model, F.mse_loss).backend == ("native" if act is nn.Tanh else "torch.func")
    V = torch.randn(3, int(keep.sum()), dtype=torch.float64)
    assert_close(hessext.hvp(model, F.mse_loss, x, y, V), V @ Hk, 1e-10, "hvp")
    diag = hessext.hessian_diag(model, F.mse_loss, x, y)
    assert list(diag) == names
    assert_close(torch.cat([t.reshape(-1) for t in diag.values()]), torch.diagonal(Hk), 1e-10, "diagonal")
    assert_close(hessext.hessian(model, F.mse_loss, x, y, output="matrix"), Hk, 1e-10, "hessian")
    nested = hessext.hessian(model, F.mse_loss, x, y)
    assert list(nested) == names and list(nested[names[0]]) == names
    blocks = hessext.hessian(model, F.mse_loss, x, y, output="matrix", blocks="layer")
    assert [b.shape[0] for b in blocks] == [24, 10]
    ggn = hessext.ggn_diag(model, F.mse_loss, x, y)
    assert list(ggn) == names
    op = hessext.HessianOperator(model, F.mse_loss, (x, y))
    assert op.shape == (int(keep.sum()),) * 2
    assert_close(op @ V.T, (V @ Hk).T, 1e-10, "operator")


def test_params_subset_and_all_frozen():
    model = model_of(nn.Tanh)
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    H = full_hessian(model, x, y)
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[:4])  # "4.weight" is the fifth parameter
    w = dict(model.named_parameters())["4.weight"]
    v = torch.randn_like(w)
    got = hessext.hvp(model, F.mse_loss, x, y, {"4.weight": v}, params={"4.weight": w.detach()})
    block = H[start : start + w.numel(), start : start + w.numel()]
    assert_close(got["4.weight"].reshape(-1), block @ v.reshape(-1), 1e-10, "params subset")
    model.requires_grad_(False)  # none requires grad: all of them
    assert_close(hessext.hessian(model, F.mse_loss, x, y, output="matrix"), H, 1e-10, "all frozen")


def test_fallback_takes_products_only_in_trainable_parameters(monkeypatch):
    """A frozen feature extractor: the exact diagonal through torch.func takes one product per
    trainable parameter (it took one per parameter: 12.6 s on such a setting)."""
    from hessext import fallback

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Softsign(), nn.Linear(64, 64), nn.Softsign(), nn.Linear(64, 3)).double()
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    x, y = torch.randn(16, 20, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    counted = []
    real = fallback.hvp

    def counting(model_, loss_fn, inputs, targets, params, vectors, keep_graph=False):
        counted.append(next(iter(vectors.values())).shape[0])
        return real(model_, loss_fn, inputs, targets, params, vectors, keep_graph)

    monkeypatch.setattr(fallback, "hvp", counting)
    diag = hessext.hessian_diag(model, F.mse_loss, x, y)
    assert sum(counted) == 64 * 3 + 3 and list(diag) == ["4.weight", "4.bias"]
