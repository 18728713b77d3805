"""CUDA-only checks (skipped without a GPU): every op on both CUDA paths against the float64 CPU
reference, a CUDA-graph capture of hessext.hvp, work on the current stream, and the input derivatives
with the gradients through them (float32 within 10x the ops' tolerance)."""

import copy

import pytest
import torch
import torch.nn as nn

import hessext
from cases import as_dict_flat, assert_close, build_stack, random_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# float32 on the GPU against the float64 CPU reference: the rounding of a few thousand products
CUDA_RTOL = {torch.float32: 2e-4, torch.float64: 1e-10}


def cuda_case(dtype, widths=(4, 9, 7, 3), n=33):
    cpu = build_stack(list(widths), [True, False, True], ["tanh", "tanh"])
    x, y = random_batch(widths[0], widths[-1], n)
    return (
        cpu,
        x,
        y,
        build_stack(list(widths), [True, False, True], ["tanh", "tanh"], dtype, "cuda"),
        x.to("cuda", dtype),
        y.to("cuda", dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_op_on_cuda_matches_cpu(dtype, path):
    cpu, x, y, gpu, xg, yg = cuda_case(dtype)
    loss = nn.MSELoss()
    names = [n for n, _ in cpu.named_parameters()]
    V = torch.randn(5, sum(p.numel() for p in cpu.parameters()), dtype=torch.float64)
    rtol = CUDA_RTOL[dtype]
    assert_close(
        hessext.hvp(gpu, loss, xg, yg, V.to("cuda", dtype)), hessext.hvp(cpu, loss, x, y, V), rtol, f"hvp {path}"
    )
    assert_close(
        hessext.ggn_vp(gpu, loss, xg, yg, V.to("cuda", dtype)), hessext.ggn_vp(cpu, loss, x, y, V), rtol, "ggn_vp"
    )
    for fn in (hessext.hessian_diag, hessext.ggn_diag):
        assert_close(
            as_dict_flat(fn(gpu, loss, xg, yg), names), as_dict_flat(fn(cpu, loss, x, y), names), rtol, fn.__name__
        )
        per = fn(gpu, loss, xg, yg, per_sample=True)
        assert_close(
            as_dict_flat({n: per[n].sum(0) for n in names}, names),
            as_dict_flat(fn(cpu, loss, x, y), names),
            rtol,
            f"{fn.__name__} per sample",
        )
    assert_close(
        hessext.hessian(gpu, loss, xg, yg, output="matrix"),
        hessext.hessian(cpu, loss, x, y, output="matrix"),
        rtol,
        "hessian",
    )
    gpu.requires_grad_(False)  # frozen weights: input derivatives run natively
    assert_close(
        hessext.input_hessian(gpu, loss, xg, yg), hessext.input_hessian(cpu, loss, x, y), rtol, "input_hessian"
    )
    assert_close(hessext.laplacian(gpu, xg), hessext.laplacian(cpu, x), rtol, "laplacian")


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_hvp_captures_in_a_cuda_graph(loss_name):
    """Under capture the finiteness check (a read-back) is left out, and the replay computes what an
    eager call on the new vectors computes; cross-entropy takes class probabilities there."""
    _, _, _, gpu, xg, yg = cuda_case(torch.float32)
    loss = nn.MSELoss() if loss_name == "mse" else nn.CrossEntropyLoss()
    if loss_name == "cross_entropy":
        yg = torch.softmax(yg, 1)
    V = torch.randn(4, sum(p.numel() for p in gpu.parameters()), device="cuda")
    eager = hessext.hvp(gpu, loss, xg, yg, V)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graphs require
        for _ in range(2):
            hessext.hvp(gpu, loss, xg, yg, V)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = hessext.hvp(gpu, loss, xg, yg, V)
    V.copy_(2 * V)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured, 2 * eager, 1e-5, "graph replay with doubled vectors")


def test_kernels_run_on_the_current_stream():
    _, _, _, gpu, xg, yg = cuda_case(torch.float32)
    V = torch.randn(2, sum(p.numel() for p in gpu.parameters()), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = hessext.hvp(gpu, nn.MSELoss(), xg, yg, V)
    side.synchronize()
    assert_close(out, hessext.hvp(gpu, nn.MSELoss(), xg, yg, V), 1e-6, "side stream")


def test_class_indices_under_capture_are_refused_by_name():
    _, _, _, gpu, xg, yg = cuda_case(torch.float32)
    labels = torch.randint(0, yg.shape[1], (yg.shape[0],), device="cuda")
    V = torch.randn(2, sum(p.numel() for p in gpu.parameters()), device="cuda")
    hessext.hvp(gpu, nn.CrossEntropyLoss(), xg, labels, V)  # eager: the native path
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        with pytest.raises(ValueError, match="targets: class indices"):
            hessext.hvp(gpu, nn.CrossEntropyLoss(), xg, labels, V)


ACTIVATIONS = [nn.Tanh, nn.SiLU, nn.GELU, lambda: nn.Softplus(beta=2.0), nn.ReLU]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", range(len(ACTIVATIONS)))
def test_input_derivatives_and_their_gradients_on_cuda(dtype, act):
    """value_gradient_laplacian, laplacian(dims), input_hessian and the PINN loss's weight and input
    gradients through them, on the GPU in grad mode, against the same calls on the float64 CPU model."""
    torch.manual_seed(act)
    make = ACTIVATIONS[act]
    cpu = nn.Sequential(nn.Linear(3, 16), make(), nn.Linear(16, 16), make(), nn.Linear(16, 2)).double()
    gpu = copy.deepcopy(cpu).to("cuda", dtype)
    x = torch.randn(37, 3, dtype=torch.float64)
    xg = x.to("cuda", dtype).requires_grad_()
    x.requires_grad_()
    rtol = CUDA_RTOL[dtype] * 10
    for dims in (None, [0, 2]):
        got = hessext.value_gradient_laplacian(gpu, xg, dims=dims)
        ref = hessext.value_gradient_laplacian(cpu, x, dims=dims)
        for a, b, what in zip(got, ref, ("u", "grad u", "lap u")):
            assert_close(a.detach(), b.detach(), rtol, f"{what} dims={dims}")

        def pinn(model, inputs, lap):
            return ((-lap - torch.sin(inputs[:, :1])) ** 2).mean() + (model(inputs[:4]) ** 2).mean()

        gpu_params, cpu_params = list(gpu.parameters()) + [xg], list(cpu.parameters()) + [x]
        g_gpu = torch.autograd.grad(pinn(gpu, xg, hessext.laplacian(gpu, xg, dims=dims)), gpu_params)
        g_cpu = torch.autograd.grad(pinn(cpu, x, hessext.laplacian(cpu, x, dims=dims)), cpu_params)
        assert_close(
            torch.cat([g.reshape(-1) for g in g_gpu]),
            torch.cat([g.reshape(-1) for g in g_cpu]),
            rtol,
            f"PINN loss gradient dims={dims}",
        )
    loss = nn.MSELoss()
    y = torch.randn(37, 2, dtype=torch.float64)
    H_gpu = hessext.input_hessian(gpu, loss, xg, y.to("cuda", dtype))
    H_cpu = hessext.input_hessian(cpu, loss, x, y)
    assert_close(H_gpu.detach(), H_cpu.detach(), rtol, "input_hessian")
    g_gpu = torch.autograd.grad(H_gpu.square().sum(), gpu[0].weight)[0]
    g_cpu = torch.autograd.grad(H_cpu.square().sum(), cpu[0].weight)[0]
    assert_close(g_gpu, g_cpu, rtol, "gradient through input_hessian")
    with torch.no_grad():  # the kernels' detached values
        assert_close(hessext.laplacian(gpu, xg), hessext.laplacian(cpu, x), rtol, "laplacian, no_grad")
