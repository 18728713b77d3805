"""One physics-informed training step, side by side in one run (2 threads): the Laplacian loss
mean((-lap u - f)^2) over N points and its gradient in every weight, for a Tanh network.

Methods: hessext.laplacian in grad mode (the forward Laplacian in torch ops, its reverse by autograd);
the same call on hessext's torch.func path (second directional derivatives, one feature at a time);
nested autograd (the gradient with create_graph, then each second derivative: the usual PINN code);
torch.func vmap over points of hessian. Each gradient is checked against nested autograd first
(1e-10 relative in float64, 1e-4 in float32). "forward only" is hessext's native Laplacian without a
gradient (torch.no_grad()): what the step's forward costs in the kernels.

On a GPU (--device cuda: float32, N=4096) torch.compile joins them (compile time apart: the warm-up):
the step with vmap(hessian) compiled, and the whole step in torch.func compiled as one graph; a method
that raises is recorded with its error instead of a time.

    python benchmarks/pinn_step.py [--device cuda]   ->   benchmarks/results/pinn_step_{cpu,gpu}.{json,md}"""
import argparse

import torch
from torch.func import hessian, jacrev, vmap

import hessext
from common import environment, median_s, mlp, write

NETS = [[2, 50, 50, 50, 1], [5, 64, 64, 64, 1]]
N = 1024


def problem(widths, dtype, device="cpu", n=N):
    torch.manual_seed(0)
    model = mlp(widths).to(device, dtype)
    x = torch.rand(n, widths[0], dtype=dtype, device=device)
    return model, x, torch.sin(x[:, :1])


def step(model, f, laplacian):
    params = list(model.parameters())
    loss = ((-laplacian() - f) ** 2).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def nested_autograd(model, x):
    x = x.clone().requires_grad_()
    u = model(x)
    g = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
    return sum(torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i:i + 1] for i in range(x.shape[1]))


def vmap_hessian(model, x):
    H = vmap(hessian(lambda p: model(p[None])[0, 0]))(x)
    return torch.diagonal(H, dim1=1, dim2=2).sum(-1, keepdim=True)


def compiled_step(model, x, f):
    """The whole step in torch.func, for torch.compile to trace as one graph: grad in the weights of
    the loss over vmap(jacrev(jacrev)) Laplacians (vmap(hessian), jacfwd over jacrev, fails to compile
    its gradient)."""
    def loss(params):
        def u(xi):
            return torch.func.functional_call(model, params, (xi[None],))[0, 0]

        H = vmap(jacrev(jacrev(u)))(x)
        return ((-torch.diagonal(H, dim1=1, dim2=2).sum(-1, keepdim=True) - f) ** 2).mean()

    grads = torch.func.grad(loss)(dict(model.named_parameters()))
    return torch.cat([g.reshape(-1) for g in grads.values()])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        torch.set_num_threads(2)
    rows = []
    for dtype in (torch.float32,) if gpu else (torch.float64, torch.float32):
        for widths in NETS[:1] if gpu else NETS:
            n = 4096 if gpu else N
            model, x, f = problem(widths, dtype, args.device, n)
            methods = {
                "hessext": lambda: step(model, f, lambda: hessext.laplacian(model, x)),
                "hessext_torch_func": lambda: step(model, f, lambda: hessext.laplacian(model, x, backend="torch.func")),
                "nested": lambda: step(model, f, lambda: nested_autograd(model, x)),
                "vmap_hessian": lambda: step(model, f, lambda: vmap_hessian(model, x)),
            }
            if gpu:  # torch.compile'd steps
                compiled = torch.compile(vmap_hessian)
                compiled_grad = torch.compile(lambda: compiled_step(model, x, f))
                methods["compiled"] = lambda: step(model, f, lambda: compiled(model, x))
                methods["compiled_grad"] = compiled_grad
            ref = methods["nested"]()
            tol = 1e-10 if dtype == torch.float64 else 1e-3 if gpu else 1e-4
            errors, failed = {}, {}
            for name, fn in list(methods.items()):
                try:
                    errors[name] = float((fn() - ref).abs().max() / ref.abs().max())
                except RuntimeError as e:  # a peer that cannot run this step is recorded, not timed
                    failed[name] = str(e).splitlines()[0][:160]
                    del methods[name]
                    continue
                assert errors[name] <= tol, f"{name} on {widths} {dtype}: relative error {errors[name]:.2e}"
            ms = {name: median_s(fn) * 1e3 for name, fn in methods.items()}
            with torch.no_grad():
                ms["forward"] = median_s(lambda: hessext.laplacian(model, x)) * 1e3
            rows.append({"net": str(widths), "N": n, "dtype": str(dtype).replace("torch.", ""), **ms,
                         "x_nested": ms["nested"] / ms["hessext"], "x_vmap_hessian": ms["vmap_hessian"] / ms["hessext"]})
            rows[-1]["max_relative_error"] = max(errors.values())
            rows[-1]["failed"] = "; ".join(f"{k}: {v}".replace("|", "/") for k, v in failed.items()) or None
            for name in ("compiled", "compiled_grad"):
                if name in ms:
                    rows[-1]["x_" + name] = ms[name] / ms["hessext"]
            print(rows[-1])
    columns = [("net", "net", "{}"), ("N", "N", "{}"), ("dtype", "dtype", "{}"), ("hessext", "hessext (ms)", "{:.2f}"),
               ("nested", "nested autograd (ms)", "{:.2f}"), ("vmap_hessian", "torch.func vmap(hessian) (ms)", "{:.2f}"),
               ("hessext_torch_func", "hessext's torch.func path (ms)", "{:.2f}"),
               ("forward", "forward only, no gradient (ms)", "{:.2f}"), ("x_nested", "x nested", "{:.2f}"),
               ("x_vmap_hessian", "x vmap(hessian)", "{:.2f}")]
    if gpu:
        columns += [(k, h, "{:.2f}") for k, h in (("compiled", "vmap(hessian) under torch.compile (ms)"),
                                                   ("compiled_grad", "torch.func step under torch.compile (ms)"),
                                                   ("x_compiled", "x compiled vmap(hessian)"),
                                                   ("x_compiled_grad", "x compiled torch.func step")) if k in rows[0]]
        columns.append(("failed", "could not run", "{}"))
    print(write(f"pinn_step_{'gpu' if gpu else 'cpu'}", environment(), rows, columns,
                ["One step: the Laplacian loss and its gradient in every weight. x: the method's time over hessext's."]))


if __name__ == "__main__":
    main()
