"""Edge shapes and modules: layers of width 0, no input features, integer inputs (an Embedding),
batch norm in training mode, TorchScript modules, sparse tensors, mistyped flags, and the benchmark
command's arguments. Each result equals torch autograd's (double backward, float64; tolerance 1e-10
relative to the largest reference entry) or the call raises a clear error."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hessext
from cases import assert_close


def autograd_hvp(model, loss_fn, x, y, vs):
    params = list(model.parameters())
    g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True, allow_unused=True)
    used = [(gi, v) for gi, v in zip(g, vs) if gi is not None and gi.requires_grad]
    hv = (
        torch.autograd.grad([u[0] for u in used], params, grad_outputs=[u[1] for u in used], allow_unused=True)
        if used
        else [None] * len(params)
    )
    return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params)])


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def vectors(model):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]


@pytest.mark.parametrize("widths", [(3, 0, 2), (0, 4, 2), (3, 4, 0)], ids=["hidden-0", "inputs-0", "outputs-0"])
def test_layers_of_width_zero(widths):
    """torch computes these (an internal RuntimeError, a ZeroDivisionError and 'at least one sample'
    before); they take torch.func, with the reason."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(widths[0], widths[1]), nn.Tanh(), nn.Linear(widths[1], widths[2])).double()
    x, y = torch.randn(5, widths[0], dtype=torch.float64), torch.randn(5, widths[2], dtype=torch.float64)
    loss = nn.MSELoss(reduction="sum")
    assert "width 0" in hessext.plan(model, loss).reason
    v = vectors(model)
    assert_close(flat(hessext.hvp(model, loss, x, y, v)), autograd_hvp(model, loss, x, y, v), 1e-10, str(widths))
    diag = hessext.hessian_diag(model, loss, x, y)
    assert [tuple(t.shape) for t in diag.values()] == [tuple(p.shape) for p in model.parameters()]


def test_integer_inputs_of_an_embedding_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randint(0, 10, (6, 2)), torch.randn(6, 2, dtype=torch.float64)
    v = vectors(model)
    assert_close(
        flat(hessext.hvp(model, F.mse_loss, x, y, v)), autograd_hvp(model, F.mse_loss, x, y, v), 1e-10, "embedding"
    )
    with pytest.raises(TypeError, match="must be floating point"):
        hessext.input_hessian(model, F.mse_loss, x, y)


def test_batch_norm_in_training_mode():
    """Batch statistics as torch's forward uses them, the running statistics untouched (they advanced
    on every product before), for 2 and 6 vectors and the diagonal (6 vectors and the diagonal
    failed before: torch.func cannot write the running statistics)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    before = {k: b.clone() for k, b in model.named_buffers()}
    V = torch.randn(6, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    shapes = [p.shape for p in model.parameters()]

    def split(row):
        return [c.reshape(s) for c, s in zip(row.split([s.numel() for s in shapes]), shapes)]

    got = {K: hessext.hvp(model, F.mse_loss, x, y, V[:K]) for K in (2, 6)}
    diag = flat(hessext.hessian_diag(model, F.mse_loss, x, y).values())
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), f"{k} moved"
    for K in (2, 6):  # the references (plain forwards in training mode) move the running statistics
        ref = torch.stack([autograd_hvp(model, F.mse_loss, x, y, split(V[k])) for k in range(K)])
        assert_close(got[K], ref, 1e-10, f"batch norm, {K} vectors")
    P = V.shape[1]
    H = torch.stack([autograd_hvp(model, F.mse_loss, x, y, split(e)) for e in torch.eye(P, dtype=torch.float64)])
    assert_close(diag, torch.diagonal(H), 1e-10, "diagonal")


def test_torchscript_modules_and_sparse_tensors_are_clear_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    v = vectors(model)
    for scripted in (torch.jit.script(model), torch.jit.trace(model, x)):
        with pytest.raises(TypeError, match="TorchScript module.*pass the nn.Module"):
            hessext.hvp(scripted, F.mse_loss, x, y, v)
    with pytest.raises(TypeError, match="inputs must be a dense tensor"):
        hessext.hvp(model, F.mse_loss, x.to_sparse(), y, v)
    with pytest.raises(TypeError, match=r"vectors\[0\] must be a dense tensor"):
        hessext.hvp(model, F.mse_loss, x, y, [v[0].to_sparse()] + v[1:])
    with pytest.raises(TypeError, match="per_sample must be True or False"):
        hessext.hessian_diag(model, F.mse_loss, x, y, per_sample="yes")
    with pytest.raises(TypeError, match="diagonal must be True or False"):
        hessext.input_hessian(model, F.mse_loss, x, y, diagonal="yes")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--k", "0"], "--k: expected a positive integer"),
        (["--k", "-3"], "--k: expected a positive integer"),
        (["--device", "foo"], "--device: 'foo' is not a device"),
        (["--threads", "-1"], "--threads: expected a positive"),
        (["--min-run-time", "0"], "--min-run-time must be positive"),
    ],
)
def test_bench_command_arguments(argv, message, capsys):
    from hessext import bench

    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_ggn_of_a_float32_lstm_without_forward_mode():
    """A float32 LSTM on the CPU has no forward-mode derivative (mkldnn_rnn_layer): the GGN's J v is
    taken in reverse mode instead; equal to the float64 model's GGN (forward mode) to float32 rounding."""

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.out = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model = Recurrent()
    x, y = torch.randn(6, 5, 3), torch.randn(6, 2)
    v = [torch.randn_like(p) for p in model.parameters()]
    got = flat(hessext.ggn_vp(model, F.mse_loss, x, y, v))
    m64 = Recurrent().double()
    m64.load_state_dict(model.state_dict())
    ref = flat(hessext.ggn_vp(m64, F.mse_loss, x.double(), y.double(), [t.double() for t in v]))
    assert_close(got.double(), ref, 1e-5, "float32 LSTM GGN")
