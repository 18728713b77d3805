"""One physics-informed training step, side by side in one run (2 threads): the Laplacian loss
mean((-lap u - f)^2) over N points and its gradient in every weight, for a Tanh network.

Methods: hessext.laplacian in grad mode (on the CPU the kernels' forward Laplacian, its reverse pass
native as the op's autograd formula); the same call on hessext's torch.func path (second directional
derivatives, one feature at a time: the narrow-input net only); nested autograd (the gradient with
create_graph, then each second derivative: the usual PINN code); torch.func vmap over points of
hessian; JAX, jit of jax.grad over folx's forward Laplacian, in a process of its own (CPU). Each
gradient is checked against nested autograd first (1e-10 relative in float64, 1e-4 in float32).
"forward only" is hessext's native Laplacian without a gradient (torch.no_grad()). The floor is the
step's products timed one by one; the peaks are the rise of resident memory over one step, beside
the bytes of the jets hessext keeps for its backward. Nets: [2,50,50,50,1] at N=1024 and the
collapsed-Taylor paper's [50,768,768,512,512,1] at N=256.

On a GPU (--device cuda: float32, N=4096) torch.compile joins them (compile time apart: the warm-up):
the step with vmap(hessian) compiled, and the whole step in torch.func compiled as one graph; a method
that raises is recorded with its error instead of a time.

    python benchmarks/pinn_step.py [--device cuda]   ->   benchmarks/results/pinn_step_{cpu,gpu}.{json,md}"""

import argparse
import os

import torch
from torch.func import hessian, jacrev, vmap

import hessext
from common import environment, median_s, mlp, product_s, write
from hessext.bench import External

NETS = [([2, 50, 50, 50, 1], 1024), ([50, 768, 768, 512, 512, 1], 256)]  # the second: the collapsed-Taylor paper's


def problem(widths, dtype, device="cpu", n=1024):
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
    return sum(torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i : i + 1] for i in range(x.shape[1]))


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


def jax_step(model, x, f):
    """The same step in JAX (jit of jax.grad over folx's forward Laplacian), in a process of its own:
    (flat gradient in torch's order, median seconds), or an error string."""
    import importlib.util

    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("folx") is None:
        return "JAX or folx not installed (pip install jax folx)"
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    arrays = {"quantity": "pinn-step", "layers": len(linears), "x": x, "y": f}
    for j, m in enumerate(linears):
        arrays[f"W{j}"], arrays[f"b{j}"] = m.weight, m.bias
    peer = External(
        "hessext.bench.jax_worker",
        {k: (t.detach().numpy() if isinstance(t, torch.Tensor) else t) for k, t in arrays.items()},
    )
    try:
        grad, timing = peer.run(1.0)
    except RuntimeError as e:
        return f"JAX failed: {e}"
    return grad, timing["median_s"]


def floor_s(widths, N, dtype):
    """Seconds of the products one step needs, each timed alone through the fastest product of the
    process (common.product_s): per layer the forward jet's [(k+2) N, n] x [n, o] (the first layer: the
    value channel's [N, n] x [n, o] alone), the reverse's weight gradient [o, (k+2) N] x [(k+2) N, n]
    and, past the first layer, its [(k+2) N, o] x [o, n]. Returns (seconds, count of products)."""
    rows = (widths[0] + 2) * N
    shapes = []
    for layer, (n, o) in enumerate(zip(widths[:-1], widths[1:])):
        m = N if layer == 0 else rows
        shapes += [(m, n, o), (o, m, n)] + ([(m, o, n)] if layer > 0 else [])
    repeat = 30 if rows * max(widths) <= 10**6 else 5  # the wide net's products take 0.1 s each
    return sum(product_s(*shape, dtype=dtype, repeat=repeat) for shape in shapes), len(shapes)


def peak_mb(method, widths, n, dtype):
    """Resident memory one step of `method` takes, MB: the peak (VmHWM) over the first step in a fresh
    process, less the resident memory before it (the model and data built)."""
    import subprocess
    import sys

    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import torch; "
        f"torch.set_num_threads(2); import pinn_step as p; "
        f"print(p.one_step_mb({method!r}, {widths!r}, {n}, torch.{str(dtype).replace('torch.', '')}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(done.stdout.split()[-1]) if done.returncode == 0 else None


def one_step_mb(method, widths, n, dtype):
    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key))

    model, x, f = problem(widths, dtype, "cpu", n)
    laplacian = {"hessext": lambda: hessext.laplacian(model, x), "vmap_hessian": lambda: vmap_hessian(model, x)}[method]
    base = status("VmRSS:")
    step(model, f, laplacian)
    return (status("VmHWM:") - base) / 1024


def saved_mb(model, x):
    """What hessext's backward keeps: the bytes of the jets the op saves."""
    lap = hessext.laplacian(model, x)
    node, total, seen = lap.grad_fn, 0, set()
    nodes = [node]
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "outputjets" in type(node).__name__.lower().replace("_", ""):
            total += sum(t.nbytes for t in node.saved_tensors if t.dim() == 3)
        nodes += [n for n, _ in node.next_functions]
    return total / 2**20


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
        for widths, n in NETS[:1] if gpu else NETS:
            n = 4096 if gpu else n
            model, x, f = problem(widths, dtype, args.device, n)
            small = widths[0] <= 5
            methods = {
                "hessext": lambda: step(model, f, lambda: hessext.laplacian(model, x)),
                "nested": lambda: step(model, f, lambda: nested_autograd(model, x)),
                "vmap_hessian": lambda: step(model, f, lambda: vmap_hessian(model, x)),
            }
            if small:  # one feature at a time: 50 passes on the wide-input net
                methods["hessext_torch_func"] = lambda: step(
                    model, f, lambda: hessext.laplacian(model, x, backend="torch.func")
                )
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
            budget = 1.0 if small else 3.0
            ms = {name: median_s(fn, budget) * 1e3 for name, fn in methods.items()}
            with torch.no_grad():
                ms["forward"] = median_s(lambda: hessext.laplacian(model, x), budget) * 1e3
            row = {"net": str(widths), "N": n, "dtype": str(dtype).replace("torch.", ""), **ms}
            if not gpu:
                peer = jax_step(model, x, f)
                if isinstance(peer, str):
                    failed["jax"] = peer
                else:
                    errors["jax"] = float((peer[0].to(ref) - ref).abs().max() / ref.abs().max())
                    assert errors["jax"] <= tol, f"JAX on {widths} {dtype}: relative error {errors['jax']:.2e}"
                    row["jax"] = peer[1] * 1e3
                floor, count = floor_s(widths, n, dtype)
                row.update(
                    floor=floor * 1e3,
                    products=count,
                    x_floor=ms["hessext"] / (floor * 1e3),
                    saved_mb=saved_mb(model, x),
                    peak_hessext_mb=peak_mb("hessext", widths, n, dtype),
                    peak_vmap_hessian_mb=peak_mb("vmap_hessian", widths, n, dtype),
                )
            for name in ("nested", "vmap_hessian", "jax", "compiled", "compiled_grad"):
                if name in row:
                    row["x_" + name] = row[name] / ms["hessext"]
            row["max_relative_error"] = max(errors.values())
            row["failed"] = "; ".join(f"{k}: {v}".replace("|", "/") for k, v in failed.items()) or None
            rows.append(row)
            print(row, flush=True)
    columns = [("net", "net", "{}"), ("N", "N", "{}"), ("dtype", "dtype", "{}"), ("hessext", "hessext (ms)", "{:.2f}")]
    columns += [
        (k, h, "{:.2f}")
        for k, h in (
            ("jax", "JAX jit(grad) over folx (ms)"),
            ("nested", "nested autograd (ms)"),
            ("vmap_hessian", "torch.func vmap(hessian) (ms)"),
            ("hessext_torch_func", "hessext's torch.func path (ms)"),
            ("compiled", "vmap(hessian) under torch.compile (ms)"),
            ("compiled_grad", "torch.func step under torch.compile (ms)"),
            ("forward", "forward only, no gradient (ms)"),
            ("floor", "floor: its products alone (ms)"),
            ("x_jax", "x JAX"),
            ("x_nested", "x nested"),
            ("x_vmap_hessian", "x vmap(hessian)"),
            ("x_compiled", "x compiled vmap(hessian)"),
            ("x_compiled_grad", "x compiled torch.func step"),
            ("x_floor", "hessext / floor"),
            ("saved_mb", "jets kept for the backward (MB)"),
            ("peak_hessext_mb", "peak, hessext (MB)"),
            ("peak_vmap_hessian_mb", "peak, vmap(hessian) (MB)"),
        )
        if any(k in r for r in rows)
    ]
    columns.append(("failed", "could not run", "{}"))
    notes = [
        "One step: the Laplacian loss and its gradient in every weight. x: the method's time over hessext's. "
        "The floor is the sum of the step's products timed one by one (forward jet, weight gradient, input "
        "gradient per layer). Peaks: the resident memory the first step adds in a fresh process."
    ]
    print(write(f"pinn_step_{'gpu' if gpu else 'cpu'}", environment(), rows, columns, notes))


if __name__ == "__main__":
    main()
