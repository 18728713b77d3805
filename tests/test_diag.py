"""Exact Hessian and GGN diagonals, GGN-vector products and the Hutchinson estimate."""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hessext
from cases import (
    DEVICES,
    DTYPES,
    RTOL,
    TinyTanhModel,
    as_dict_flat,
    assert_close,
    build_stack,
    random_batch,
    random_stack,
    reference_ggn,
    reference_hessian,
    tiny_tanh_loss,
    log_softmax_classifier,
)
from hessext import fallback


def stack_case(case, dtype=torch.float64, device="cpu", max_width=20):
    rng = random.Random(100 + case)
    widths, biases, acts = random_stack(rng, max_width=max_width)
    model = build_stack(widths, biases, acts, dtype, device, seed=case)
    n = rng.choice([1, rng.randint(2, 200)])
    x, y = random_batch(widths[0], widths[-1], n, dtype, device, seed=case)
    loss_fn = nn.MSELoss(reduction=rng.choice(["mean", "sum"]))
    return f"{widths} bias={biases} acts={acts} N={n} {loss_fn.reduction}", model, x, y, loss_fn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(10))
def test_hessian_diag_matches_torch_func(case, dtype, device, path):
    label, model, x, y, loss_fn = stack_case(case, dtype, device)
    names = [n for n, _ in model.named_parameters()]
    got = hessext.hessian_diag(model, loss_fn, x, y, backend="native")
    assert list(got) == names and all(
        got[n].shape == p.shape and got[n].dtype == dtype for n, p in model.named_parameters()
    )
    H = reference_hessian(model.cpu(), loss_fn, x.cpu(), y.cpu())
    assert_close(as_dict_flat(got, names), torch.diagonal(H), RTOL[dtype], f"{label} {path}")


@pytest.mark.parametrize("case", range(6))
def test_per_sample_diagonals(case, path):
    label, model, x, y, loss_fn = stack_case(case)
    names = [n for n, _ in model.named_parameters()]
    full = hessext.hessian_diag(model, loss_fn, x, y)
    per = hessext.hessian_diag(model, loss_fn, x, y, per_sample=True)
    N = x.shape[0]
    assert all(per[n].shape == (N,) + p.shape for n, p in model.named_parameters())
    assert_close(
        torch.stack([as_dict_flat({n: per[n][m] for n in names}, names) for m in range(N)]).sum(0),
        as_dict_flat(full, names),
        1e-10,
        f"sum of per-sample diagonals {label}",
    )
    # sample m's own term: scale * sum_c (f(x_m) - y_m)^2, scale = 1/(N C) for mean
    scale = 1.0 / y.numel() if loss_fn.reduction == "mean" else 1.0
    m = N // 2
    own = reference_hessian(model, lambda o, t: scale * ((o - t) ** 2).sum(), x[m : m + 1], y[m : m + 1])
    assert_close(as_dict_flat({n: per[n][m] for n in names}, names), torch.diagonal(own), 1e-10, f"sample {m} {label}")
    ggn_per = hessext.ggn_diag(model, loss_fn, x, y, per_sample=True)
    assert_close(
        torch.stack([as_dict_flat({n: ggn_per[n][k] for n in names}, names) for k in range(N)]).sum(0),
        as_dict_flat(hessext.ggn_diag(model, loss_fn, x, y), names),
        1e-10,
        "GGN per-sample sum",
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(8))
def test_ggn_diag_and_products_match_jt_h_j(case, dtype, path):
    label, model, x, y, loss_fn = stack_case(case, dtype)
    names = [n for n, _ in model.named_parameters()]
    G = reference_ggn(model, loss_fn, x, y)
    assert_close(
        as_dict_flat(hessext.ggn_diag(model, loss_fn, x, y, backend="native"), names),
        torch.diagonal(G),
        RTOL[dtype],
        f"GGN diagonal {label}",
    )
    V = torch.randn(3, G.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(case))
    got = hessext.ggn_vp(model, loss_fn, x, y, V.to(dtype), backend="native")
    assert_close(got, V @ G, RTOL[dtype], f"ggn_vp {label}")


def test_ggn_vp_both_paths_and_fallback(path):
    model = build_stack([4, 9, 7, 3], [True, False, True], ["tanh", "tanh"])
    x, y = random_batch(4, 3, 33)
    V = torch.randn(5, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    native = hessext.ggn_vp(model, F.mse_loss, x, y, V, backend="native")
    ref = hessext.ggn_vp(model, F.mse_loss, x, y, V, backend="torch.func")
    assert_close(native, ref, 1e-10, f"ggn_vp {path} vs torch.func")


def test_ggn_equals_hessian_without_tanh():
    """Without tanh the output is linear in each single weight, so the diagonals coincide; the full
    matrices coincide only for one Linear (deeper linear stacks are bilinear across layers)."""
    model = build_stack([5, 6, 4, 2], [True, True, False], ["identity", "identity"])
    x, y = random_batch(5, 2, 21)
    names = [n for n, _ in model.named_parameters()]
    loss = nn.MSELoss()
    assert_close(
        as_dict_flat(hessext.ggn_diag(model, loss, x, y), names),
        as_dict_flat(hessext.hessian_diag(model, loss, x, y), names),
        1e-12,
        "diag",
    )
    single = nn.Linear(5, 2).double()
    V = torch.randn(4, 12, dtype=torch.float64)
    assert_close(hessext.ggn_vp(single, loss, x, y, V), hessext.hvp(single, loss, x, y, V), 1e-12, "products")
    deep = torch.randn(4, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    assert (hessext.ggn_vp(model, loss, x, y, deep) - hessext.hvp(model, loss, x, y, deep)).abs().max() > 1e-3


def test_tiny_tanh_and_log_softmax_classifier_diagonals():
    torch.manual_seed(0)
    net = TinyTanhModel().double()
    x, t = torch.randn(100, 1, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    names = [n for n, _ in net.named_parameters()]
    H = reference_hessian(net, tiny_tanh_loss, x, t)
    assert_close(as_dict_flat(hessext.hessian_diag(net, tiny_tanh_loss, x, t), names), torch.diagonal(H), 1e-12)

    model = log_softmax_classifier().double()
    x2, y2 = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2])
    names2 = [n for n, _ in model.named_parameters()]
    assert hessext.plan(model, nn.NLLLoss()).backend == "native"
    H2 = reference_hessian(model, nn.NLLLoss(), x2, y2)
    assert_close(as_dict_flat(hessext.hessian_diag(model, nn.NLLLoss(), x2, y2), names2), torch.diagonal(H2), 1e-12)
    G2 = reference_ggn(model, nn.NLLLoss(), x2, y2)
    assert_close(as_dict_flat(hessext.ggn_diag(model, nn.NLLLoss(), x2, y2), names2), torch.diagonal(G2), 1e-12)
    per = hessext.hessian_diag(model, nn.NLLLoss(), x2, y2, per_sample=True)
    assert_close(as_dict_flat({k: v.sum(0) for k, v in per.items()}, names2), torch.diagonal(H2), 1e-12)
    softsign = nn.Sequential(nn.Linear(5, 3), nn.Softsign(), nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match="per_sample=True needs the native path"):
        hessext.hessian_diag(softsign, nn.CrossEntropyLoss(), x2, y2, per_sample=True)


def test_fallback_refuses_absurd_work(monkeypatch):
    model = nn.Sequential(nn.Linear(5, 8), nn.Softsign(), nn.Linear(8, 3), nn.LogSoftmax(dim=-1)).double()
    monkeypatch.setattr(fallback, "MAX_BASIS_PRODUCTS", 10)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2])
    with pytest.raises(ValueError, match=r"needs 75 products.*hutchinson_diag"):
        hessext.hessian_diag(model, nn.NLLLoss(), x, y)


def test_rademacher_samples_are_plus_minus_one_with_mean_zero():
    from hessext.curvature import rademacher

    v = rademacher((200_000,), torch.Generator().manual_seed(0))
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert abs(v.mean().item()) < 0.01  # 4.5 standard deviations of the mean of 200k +-1 draws
    w = rademacher((200_000,), torch.Generator().manual_seed(1))
    assert abs((v * w).mean().item()) < 0.01  # independent draws
    again = rademacher((200_000,), torch.Generator().manual_seed(0))
    assert torch.equal(v, again)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_unbiased_otherwise():
    # Linear + MSE with orthogonal input columns: H = 2/(N C) kron(I, X^T X) is diagonal.
    N = d = 6
    model = nn.Linear(d, 1, bias=False).double()
    x = torch.diag(torch.arange(1.0, d + 1, dtype=torch.float64))
    y = torch.randn(N, 1, dtype=torch.float64)
    est = hessext.hutchinson_diag(model, nn.MSELoss(), x, y, samples=3, generator=torch.Generator().manual_seed(0))
    assert_close(est["weight"], hessext.hessian_diag(model, nn.MSELoss(), x, y)["weight"], 1e-12, "diagonal H")

    net = build_stack([3, 8, 2], [True, True], ["tanh"])
    x, y = random_batch(3, 2, 40)
    names = [n for n, _ in net.named_parameters()]
    exact = as_dict_flat(hessext.hessian_diag(net, nn.MSELoss(), x, y), names)
    est = as_dict_flat(
        hessext.hutchinson_diag(net, nn.MSELoss(), x, y, samples=4000, generator=torch.Generator().manual_seed(0)),
        names,
    )
    # the estimate's error shrinks like 1/sqrt(samples): 4000 samples put it within a few percent
    assert (est - exact).abs().max() < 0.1 * exact.abs().max()


def test_diag_bad_input():
    net = TinyTanhModel().double()
    x, t = torch.randn(10, 1, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    for fn in (hessext.hessian_diag, hessext.ggn_diag):
        with pytest.raises(TypeError, match="inputs must have dtype torch.float64"):
            fn(net, tiny_tanh_loss, x.float(), t)
        with pytest.raises(ValueError, match=r"targets must have shape \(10,\)"):
            fn(net, tiny_tanh_loss, x, t[:5])
        with pytest.raises(ValueError, match="inputs must hold at least one sample"):
            fn(net, tiny_tanh_loss, x[:0], t[:0])
    with pytest.raises(ValueError, match="samples must be a positive int"):
        hessext.hutchinson_diag(net, tiny_tanh_loss, x, t, samples=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        hessext.hutchinson_diag(net, tiny_tanh_loss, x, t, generator=3)
