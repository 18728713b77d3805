"""Full weight Hessians (dict, matrix, block-diagonal), input Hessians and Laplacians against
float64 torch.func, exact symmetry, consistency with hvp and hessian_diag, memory refusal."""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import hessian as func_hessian, jacfwd, jacrev, vmap

import hessext
from cases import (
    DTYPES,
    RTOL,
    TinyTanhModel,
    as_dict_flat,
    assert_close,
    build_stack,
    random_batch,
    random_stack,
    reference_hessian,
    tiny_tanh_loss,
    log_softmax_classifier,
)


def case_model(case, dtype=torch.float64, max_width=12):
    rng = random.Random(200 + case)
    widths, biases, acts = random_stack(rng, max_width=max_width)
    model = build_stack(widths, biases, acts, dtype, seed=case)
    n = rng.choice([1, rng.randint(2, 120)])
    x, y = random_batch(widths[0], widths[-1], n, dtype, seed=case)
    return f"{widths} bias={biases} acts={acts} N={n}", model, x, y, nn.MSELoss(reduction=rng.choice(["mean", "sum"]))


@pytest.mark.parametrize("biases", [[True, False, True], [False, True, False]])
def test_dense_hessian_summed_over_chunks(biases):
    """float32 sums run in chunks of 256 samples (csrc/hessian.h), here three, accumulated in float64;
    tolerance 1e-5 relative (float32 factors, float64 sums)."""
    model = build_stack([3, 20, 20, 2], biases, [nn.Tanh, nn.Tanh], torch.float32, seed=7)
    x, y = random_batch(3, 2, 600, torch.float32, seed=7)
    H = hessext.hessian(model, nn.MSELoss(), x, y, output="matrix", backend="native")
    ref = reference_hessian(model, nn.MSELoss(), x, y)
    assert_close(H, ref, 1e-5, f"biases {biases}")
    assert torch.equal(H, H.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(10))
def test_dense_hessian_matches_torch_func(case, dtype, path):
    label, model, x, y, loss = case_model(case, dtype)
    label = f"{label} {path}"
    H = hessext.hessian(model, loss, x, y, output="matrix", backend="native")
    ref = reference_hessian(model, loss, x, y)
    assert H.dtype == dtype and H.shape == ref.shape
    assert_close(H, ref, RTOL[dtype], label)
    assert torch.equal(H, H.T), "the Hessian must be exactly symmetric"
    # hessian @ v == hvp(v), diag(hessian) == hessian_diag
    V = torch.randn(3, H.shape[0], dtype=dtype, generator=torch.Generator().manual_seed(case))
    assert_close(V @ H, hessext.hvp(model, loss, x, y, V), RTOL[dtype] * 10, f"H v {label}")
    names = [n for n, _ in model.named_parameters()]
    assert_close(torch.diagonal(H), as_dict_flat(hessext.hessian_diag(model, loss, x, y), names), RTOL[dtype] * 10)


@pytest.mark.parametrize("case", range(4))
def test_dict_layout_and_layer_blocks(case):
    label, model, x, y, loss = case_model(case)
    params = dict(model.named_parameters())
    names = list(params)
    H = hessext.hessian(model, loss, x, y, output="matrix")
    D = hessext.hessian(model, loss, x, y)
    starts = torch.tensor([0] + [p.numel() for p in params.values()]).cumsum(0).tolist()
    for a, na in enumerate(names):
        assert list(D[na]) == names
        for b, nb in enumerate(names):
            assert D[na][nb].shape == params[na].shape + params[nb].shape
            assert torch.equal(
                D[na][nb].reshape(params[na].numel(), -1), H[starts[a] : starts[a + 1], starts[b] : starts[b + 1]]
            )
    layer_mats = hessext.hessian(model, loss, x, y, output="matrix", blocks="layer")
    layer_dict = hessext.hessian(model, loss, x, y, blocks="layer")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(layer_mats) == len(linears)
    r0 = 0
    for lin, mat in zip(linears, layer_mats):
        n = sum(p.numel() for p in lin.parameters())
        assert_close(mat, H[r0 : r0 + n, r0 : r0 + n], 1e-12, f"layer block {label}")
        assert torch.equal(mat, mat.T)
        r0 += n
    for na in names:  # only same-layer pairs
        assert set(layer_dict[na]) == {nb for nb in names if nb.split(".")[0] == na.split(".")[0]}


def test_tiny_tanh_dict_like_torch_func():
    """The 1-16-1 network's code prints hess[key][key].shape: (16, 1, 16, 1) for fc1.weight."""
    torch.manual_seed(0)
    net = TinyTanhModel().double()
    inputs, targets = torch.randn(100, 1, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    hess = hessext.hessian(net, tiny_tanh_loss, inputs, targets)
    key = list(dict(net.named_parameters()))[0]
    assert hess[key][key].shape == (16, 1, 16, 1)
    params = dict(net.named_parameters())

    def compute_loss(p):
        return tiny_tanh_loss(torch.func.functional_call(net, p, (inputs,)), targets)

    ref = func_hessian(compute_loss)(params)
    for a in params:
        for b in params:
            assert_close(hess[a][b], ref[a][b], 1e-12, f"{a},{b}")


def test_parameter_order_differs_from_stack_order():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(5, 2)
            self.fc1 = nn.Linear(3, 5)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    model = Reordered().double()
    x, y = random_batch(3, 2, 11)
    H = hessext.hessian(model, nn.MSELoss(), x, y, output="matrix")
    assert_close(H, reference_hessian(model, nn.MSELoss(), x, y), 1e-12, "reordered")
    blocks = hessext.hessian(model, nn.MSELoss(), x, y, output="matrix", blocks="layer")
    assert_close(blocks[0], H[:12, :12], 1e-12, "fc2 block (first in named order)")


def test_fallback_hessian_log_softmax_classifier():
    model = log_softmax_classifier().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2])
    H = hessext.hessian(model, nn.NLLLoss(), x, y, output="matrix")
    assert_close(H, reference_hessian(model, nn.NLLLoss(), x, y), 1e-12, "fallback")
    assert torch.equal(H, H.T)
    layer = hessext.hessian(model, nn.NLLLoss(), x, y, output="matrix", blocks="layer")
    assert_close(layer[1], H[48:, 48:], 1e-12, "fallback layer block")


def test_memory_refusal_names_the_bytes():
    model = build_stack([10, 64, 64, 1], [True, True, True], ["tanh", "tanh"])
    x, y = random_batch(10, 1, 4)
    with pytest.raises(
        ValueError,
        match=r"of 4929 parameters would need [0-9,]+ bytes, more than the 1,000,000 bytes"
        r".*blocks='layer'.*hessext.hvp",
    ):
        hessext.hessian(model, nn.MSELoss(), x, y, max_bytes=10**6)
    assert len(hessext.hessian(model, nn.MSELoss(), x, y, output="matrix", blocks="layer", max_bytes=4 * 10**8)) == 3
    with pytest.raises(ValueError, match="output must be one of"):
        hessext.hessian(model, nn.MSELoss(), x, y, output="list")
    with pytest.raises(ValueError, match="blocks must be one of"):
        hessext.hessian(model, nn.MSELoss(), x, y, blocks="diag")
    with pytest.raises(ValueError, match=r"input_hessian.* would need"):
        hessext.input_hessian(model, nn.MSELoss(), x, y, max_bytes=100)


def input_reference(model, loss, x, y):
    Hx = func_hessian(lambda xx: loss(model(xx), y))(x)
    return torch.stack([Hx[n, :, n, :] for n in range(x.shape[0])])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(8))
def test_input_hessian_and_laplacian(case, dtype):
    label, model, x, y, loss = case_model(case, dtype)
    model.requires_grad_(
        False
    )  # frozen weights: input derivatives run natively (with trainable ones they carry a gradient, through torch.func)
    m64, x64, y64 = (
        build_stack(*random_stack(random.Random(200 + case), max_width=12), seed=case),
        x.double(),
        y.double(),
    )
    ref = input_reference(m64, loss, x64, y64)
    got = hessext.input_hessian(model, loss, x, y, backend="native")
    assert got.shape == ref.shape and got.dtype == dtype
    assert_close(got, ref, RTOL[dtype], f"input Hessian {label}")
    assert_close(
        hessext.input_hessian(model, loss, x, y, diagonal=True),
        torch.diagonal(ref, dim1=1, dim2=2),
        RTOL[dtype],
        f"input Hessian diagonal {label}",
    )
    out_h = vmap(jacfwd(jacrev(lambda xm: m64(xm[None])[0])))(x64)  # [N, C, d, d]
    assert_close(
        hessext.laplacian(model, x, backend="native"),
        torch.diagonal(out_h, dim1=2, dim2=3).sum(-1),
        RTOL[dtype],
        f"Laplacian {label}",
    )


def test_wide_input_uses_backward_recurrence():
    """d = 40 > the hidden widths: the input Hessian comes from the backward recurrence."""
    model = build_stack([40, 6, 5, 2], [True, True, False], ["tanh", "tanh"])
    x, y = random_batch(40, 2, 7)
    ref = input_reference(model, nn.MSELoss(), x, y)
    model.requires_grad_(
        False
    )  # frozen weights: input derivatives run natively (with trainable ones they carry a gradient, through torch.func)
    assert_close(hessext.input_hessian(model, nn.MSELoss(), x, y), ref, 1e-10, "full")
    assert_close(
        hessext.input_hessian(model, nn.MSELoss(), x, y, diagonal=True),
        torch.diagonal(ref, dim1=1, dim2=2),
        1e-10,
        "diagonal",
    )


def test_log_softmax_classifier_input_hessian_and_laplacian_fallback():
    """A log-softmax classifier's Hessian of the NLL with respect to the input."""
    model = log_softmax_classifier().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 1])
    ref = input_reference(model, nn.NLLLoss(), x, y)
    got = hessext.input_hessian(model, nn.NLLLoss(), x, y)
    assert got.shape == (4, 5, 5)
    assert_close(got, ref, 1e-12, "log-softmax classifier input Hessian")
    out_h = vmap(jacfwd(jacrev(lambda xm: model(xm[None])[0])))(x)
    assert_close(
        hessext.laplacian(model, x),
        torch.diagonal(out_h, dim1=2, dim2=3).sum(-1),
        1e-12,
        "log-softmax classifier Laplacian",
    )


def test_tiny_tanh_laplacian_shape_and_op_fakes():
    net = TinyTanhModel().double()
    x = torch.randn(7, 1, dtype=torch.float64)
    assert hessext.laplacian(net, x).shape == (7,)
    lin = build_stack([3, 4, 2], [True, False], ["tanh"])
    xs, ys = random_batch(3, 2, 5)
    W, b = [lin[0].weight.detach(), lin[2].weight.detach()], [lin[0].bias.detach(), None]
    utils = ("test_schema", "test_faketensor")
    for layer_blocks in (False, True):
        torch.library.opcheck(
            torch.ops.hessext.hessian.default,
            (xs, ys, W, b, [1], [0.0, 0.0], 0, 0.0, 0.1, layer_blocks),
            test_utils=utils,
        )
    for mode in (0, 1, 2):
        torch.library.opcheck(
            torch.ops.hessext.input_derivatives.default,
            (xs, ys, W, b, [1], [0.0, 0.0], 0, 0.0, 0.1, mode),
            test_utils=utils,
        )


def _vm_flags(address):
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(h, 16) for h in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return None


def _huge_pages_on():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _huge_pages_on(), reason="transparent huge pages are off or absent on this kernel")
def test_large_hessian_asks_for_huge_pages():
    """A dense Hessian of 32 MB or more (here P = 2904, 67 MB in float64) is allocated with
    madvise(MADV_HUGEPAGE) before it is written (csrc/workspace.h, empty_output): its mapping carries
    the kernel's "hg" flag. Its values: H v against hvp (1e-10 relative), exact symmetry, the
    diagonal against hessian_diag (1e-10)."""
    model = build_stack([20, 64, 24], [True, True], ["tanh"], seed=3)
    x, y = random_batch(20, 24, 8, seed=3)
    H = hessext.hessian(model, nn.MSELoss(), x, y, output="matrix", backend="native")
    assert H.shape == (2904, 2904) and H.nbytes >= 32 << 20
    assert "hg" in _vm_flags(H.data_ptr() + H.nbytes // 2)
    V = torch.randn(2, 2904, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_close(V @ H, hessext.hvp(model, nn.MSELoss(), x, y, V), 1e-10, "H v")
    assert torch.equal(H, H.T)
    names = [n for n, _ in model.named_parameters()]
    assert_close(torch.diagonal(H), as_dict_flat(hessext.hessian_diag(model, nn.MSELoss(), x, y), names), 1e-10)


class Centred(nn.Module):
    """Couples the samples: the batch mean is subtracted in forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x - x.mean(0))))


@pytest.mark.parametrize("N", [1, 6])
def test_input_derivatives_of_a_model_that_couples_samples(N):
    """A batch-centring forward: each sample's block of the [N, d, N, d] input Hessian and each
    sample's Laplacian, exactly (the fallback's one-direction-per-feature shortcut gave zeros)."""
    torch.manual_seed(0)
    model = Centred().double()
    x, y = torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64)
    H = func_hessian(lambda xx: F.mse_loss(model(xx), y))(x)
    ref = torch.stack([H[n, :, n, :] for n in range(N)])
    assert_close(hessext.input_hessian(model, F.mse_loss, x, y).detach(), ref, 1e-12, "input Hessian")
    assert_close(
        hessext.input_hessian(model, F.mse_loss, x, y, diagonal=True).detach(),
        torch.diagonal(ref, dim1=1, dim2=2),
        1e-12,
        "input Hessian diagonal",
    )
    J = jacfwd(jacrev(model))(x)  # [N, C, N, d, N, d]
    lap = torch.stack([torch.diagonal(J[n, :, n, :, n, :], dim1=-2, dim2=-1).sum(-1) for n in range(N)])
    assert_close(hessext.laplacian(model, x).detach(), lap, 1e-12, "Laplacian")


def test_vmap_over_hessian_and_diagonal():
    """vmap of a function calling hessext.hessian or hessian_diag (each batch element its own data):
    equal to the loop (crashed with 'inplace arithmetic ... is not possible' before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X, Y = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 5, 1, dtype=torch.float64)

    def hess(x, y):
        return hessext.hessian(model, F.mse_loss, x, y, output="matrix")

    def diag(x, y):
        return hessext.hessian_diag(model, F.mse_loss, x, y)["0.weight"]

    for fn in (hess, diag):
        got = torch.func.vmap(fn)(X, Y).detach()
        ref = torch.stack([fn(X[i], Y[i]) for i in range(3)]).detach()
        assert_close(got, ref, 1e-12, fn.__name__)
    nested = torch.func.vmap(lambda x, y: hessext.hessian(model, F.mse_loss, x, y))(X, Y)
    assert nested["0.weight"]["0.bias"].shape == (3, 4, 2, 4)
    for fn in (lambda x, y: hessext.laplacian(model, x), lambda x, y: hessext.input_hessian(model, F.mse_loss, x, y)):
        got = torch.func.vmap(fn)(X, Y).detach()  # the coupling probe cannot read values there: the exact path
        assert_close(got, torch.stack([fn(X[i], Y[i]) for i in range(3)]).detach(), 1e-12, "input derivatives")
