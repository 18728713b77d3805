"""hessext.kfac_factors: the GGN's Kronecker factors of every Linear layer against a float64 reference
by their definition (A_l = rows^T rows / M from the layer's inputs; B_l = sum_m J_m^T H_m J_m with each
sample's Jacobian of the output in the layer's pre-activation by torch.func.jacrev and the loss's Hessian
blocks by torch.func.hessian), on random stacks of every native activation and loss (both reductions,
widths and batches including 1, bias on and off), to 1e-10 relative in float64 and 2e-4 in float32;
against curvlinops' KFACLinearOperator (TYPE2) where it is installed; and the errors for what it cannot
serve. laplace-torch's KFAC through these factors: tests/test_integrations_laplace.py."""

import pytest
import torch
import torch.nn as nn
from torch.func import hessian, jacrev, vmap

import hessext
from tests.cases import DTYPES, RTOL, assert_close
from tests.test_coverage import LOSSES, random_case


def reference(model, loss_fn, x, y):
    """{name: (A, B, |B|)} in float64 by the definition, for an nn.Sequential; |B| sums the terms'
    magnitudes (the scale of B's rounding, where B itself is near zero: a confident classifier's H)."""
    import copy

    m = copy.deepcopy(model).double()
    x = x.double()
    y = y.double() if y.is_floating_point() else y
    layers = list(m)
    out = m(x)
    H = hessian(lambda o: loss_fn(o, y))(out.detach())  # [M, C, M, C], block diagonal in the rows
    M, C = out.shape
    blocks = torch.stack([H[i, :, i, :] for i in range(M)])
    result, a = {}, x
    for k, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            z = layer(a)
            rest = nn.Sequential(*layers[k + 1 :]) if k + 1 < len(layers) else nn.Identity()
            J = vmap(jacrev(lambda t: rest(t[None])[0]))(z.detach())  # [M, C, n]
            B = torch.einsum("mci,mcd,mdj->ij", J, blocks, J)
            magnitude = torch.einsum("mci,mcd,mdj->ij", J.abs(), blocks.abs(), J.abs())
            result[str(k)] = (a.T @ a / M, B, magnitude)
        a = layer(a)
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(16))
def test_factors_equal_their_definition(case, dtype):
    model, loss, x, y, tag = random_case(case, dtype)
    if LOSSES[case % len(LOSSES)] == "nll":  # the GGN is taken at the logits: refused (below)
        model = nn.Sequential(*list(model)[:-1])
        loss = nn.CrossEntropyLoss(reduction=loss.reduction)
    got = hessext.kfac_factors(model, loss, x, y)
    want = reference(model, loss, x, y)
    assert list(got) == list(want), tag
    for name, (A, B) in got.items():
        assert A.dtype == dtype and B.dtype == dtype
        assert_close(A, want[name][0], RTOL[dtype], f"A of layer {name}: {tag}")
        floor = want[name][2].abs().max().item()
        assert_close(B, want[name][1], RTOL[dtype], f"B of layer {name}: {tag}", floor=floor)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", [nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss])
def test_factors_equal_curvlinops(loss, reduction):
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops not installed (pip install hessext[curvlinops])")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6, bias=False), nn.GELU(), nn.Linear(6, 3)).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = {
        nn.MSELoss: torch.randn(40, 3, dtype=torch.float64),
        nn.CrossEntropyLoss: torch.randint(0, 3, (40,)),
        nn.BCEWithLogitsLoss: torch.randint(0, 2, (40, 3)).double(),  # curvlinops takes binary targets
    }[loss]
    loss_fn = loss(reduction=reduction)
    op = curvlinops.KFACLinearOperator(
        model,
        loss_fn,
        list(model.parameters()),
        [(x, y)],
        fisher_type=curvlinops.FisherType.TYPE2,
        separate_weight_and_bias=True,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    for name, (A, B) in hessext.kfac_factors(model, loss_fn, x, y).items():
        assert_close(A, op._input_covariances[name], 1e-12, f"A of {name}")
        assert_close(B, op._gradient_covariances[name], 1e-12, f"B of {name}")


def test_bias_block_is_the_ggn_block():
    """B_l is exactly the GGN's block of layer l's bias."""
    from tests.cases import reference_ggn

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    G = reference_ggn(model, nn.MSELoss(), x, y)
    names = [n for n, _ in model.named_parameters()]
    offsets = torch.tensor([0] + [p.numel() for p in model.parameters()]).cumsum(0)
    factors = hessext.kfac_factors(model, nn.MSELoss(), x, y)
    for layer in ("0", "2", "4"):
        j = names.index(f"{layer}.bias")
        lo, hi = offsets[j], offsets[j + 1]
        assert_close(factors[layer][1], G[lo:hi, lo:hi], 1e-10, f"bias block of layer {layer}")


def test_what_it_cannot_serve_is_refused():
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    classifier = nn.Sequential(nn.Linear(3, 2), nn.LogSoftmax(dim=-1))
    with pytest.raises(ValueError, match="LogSoftmax"):
        hessext.kfac_factors(classifier, nn.NLLLoss(), x, y)
    conv = nn.Sequential(nn.Conv1d(1, 2, 2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="kernels serve"):
        hessext.kfac_factors(conv, nn.CrossEntropyLoss(), torch.randn(6, 1, 3), y)
