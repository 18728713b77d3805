"""The Gauss-Newton (Gramian) product of a physics-informed loss, side by side in one run (2 threads):
G v for the loss mean((-lap u - f)^2) over N points of a Tanh network, one vector and K=16 at once.

Methods: hessext.pinn_ggn_vp (the jets, their per-point loss Hessian, the tangent pass and the
jets' reverse pass; for the stacks the kernels serve, their forward jets and reverse pass), and the
product alone on a built hessext.GramianOperator (what a CG solve repeats); torch.func, jvp and vjp
over the Laplacian of vmap(hessian) per point; JAX, jit of jax.jvp and jax.vjp over folx's forward
Laplacian (vmap of it for K), in a process of its own. Every result is checked against torch.func's
first (1e-10 relative in float64). The floor is the product's matrix products timed one by one (the
forward jet's; per vector the tangent's two per layer and the reverse's two per layer).

    python benchmarks/gramian.py   ->   benchmarks/results/gramian_cpu.{json,md}"""

import torch
from torch.func import functional_call, hessian, jvp, vjp, vmap

import hessext
from common import environment, median_s, mlp, product_s, write
from hessext.bench import External

NETS = [([2, 50, 50, 50, 1], 1024), ([2, 32, 32, 1], 1024)]


def problem(widths, n, dtype=torch.float64):
    torch.manual_seed(0)
    model = mlp(widths).to(dtype)
    x = torch.rand(n, widths[0], dtype=dtype)
    return model, x, torch.sin(x[:, :1])


def torch_func_product(model, x, V):
    """(2/N) J^T J V for J the Jacobian of the points' Laplacians (vmap of hessian) in the parameters."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def laplacians(p):
        H = vmap(hessian(lambda xi: functional_call(model, p, (xi[None],))[0, 0]))(x)
        return torch.diagonal(H, dim1=1, dim2=2).sum(-1)

    _, back = vjp(laplacians, params)
    out = []
    for v in V:
        tangent = dict(zip(params, _split(v, params)))
        Jv = jvp(laplacians, (params,), (tangent,))[1]
        out.append(torch.cat([t.reshape(-1) for t in back(2.0 / Jv.numel() * Jv)[0].values()]))
    return torch.stack(out)


def _split(v, params):
    sizes = [p.numel() for p in params.values()]
    return [c.reshape(p.shape) for c, p in zip(v.split(sizes), params.values())]


def jax_product(model, x, f, V):
    import importlib.util

    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("folx") is None:
        return "JAX or folx not installed (pip install jax folx)"
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    arrays = {"layers": len(linears), "x": x.numpy(), "y": f.numpy()}
    for j, m in enumerate(linears):
        arrays[f"W{j}"], arrays[f"b{j}"] = m.weight.detach().numpy(), m.bias.detach().numpy()
    if V.shape[0] == 1:
        arrays.update(quantity="pinn-gramian", v=V[0].numpy())
    else:
        arrays.update(quantity="pinn-gramian-batched", V=V.numpy())
    try:
        result, timing = External("hessext.bench.jax_worker", arrays).run(1.0)
    except RuntimeError as e:
        return f"JAX failed: {e}"
    K = V.shape[0]
    if K == 1:
        return result.reshape(1, -1), timing["median_s"]
    sizes = [K * p.numel() for m in linears for p in (m.weight, m.bias)]  # param-major: [K, *shape] per parameter
    return torch.cat([c.reshape(K, -1) for c in result.split(sizes)], 1), timing["median_s"]


def floor_s(widths, N, K, dtype):
    """Seconds of the product's matrix products, each timed alone (common.product_s): the forward jet's
    per layer ([N, n] x [n, o] for the first layer's value channel, [(k+2) N, n] x [n, o] past it); per
    vector, the tangent's jet times the weight direction [(k+2) N, n] x [n, o] and, past the first layer,
    its tangent times the weight; the reverse's weight gradient [o, (k+2) N] x [(k+2) N, n] and, past the
    first layer, its [(k+2) N, o] x [o, n]. Returns (seconds, count of products)."""
    rows = (widths[0] + 2) * N
    once, each = [], []
    for layer, (n, o) in enumerate(zip(widths[:-1], widths[1:])):
        once.append((N if layer == 0 else rows, n, o))
        each += [(rows, n, o), (o, rows, n)] + ([(rows, n, o), (rows, o, n)] if layer > 0 else [])
    total = sum(product_s(*s, dtype=dtype) for s in once) + K * sum(product_s(*s, dtype=dtype) for s in each)
    return total, len(once) + K * len(each)


def main():
    torch.set_num_threads(2)
    rows = []
    for widths, n in NETS:
        model, x, f = problem(widths, n)

        def interior(u, grad_u, lap_u, inputs):
            return ((-lap_u - f) ** 2).mean()

        P = sum(p.numel() for p in model.parameters())
        for K in (1, 16):
            V = torch.randn(K, P, dtype=torch.float64, generator=torch.Generator().manual_seed(K))
            ref = torch_func_product(model, x, V)
            op = hessext.GramianOperator(model, [(interior, x)])
            methods = {
                "hessext": lambda: hessext.pinn_ggn_vp(model, interior, x, V if K > 1 else V[0]),
                "operator": lambda: op @ (V.T if K > 1 else V[0]),
                "torch_func": lambda: torch_func_product(model, x, V),
            }
            errors = {}
            for name, fn in methods.items():
                got = fn()
                got = got.T if name == "operator" and K > 1 else got
                errors[name] = float((got.reshape(K, -1) - ref).abs().max() / ref.abs().max())
                assert errors[name] <= 1e-10, f"{name}: relative error {errors[name]:.2e}"
            ms = {name: median_s(fn, 1.0) * 1e3 for name, fn in methods.items()}
            row = {"net": str(widths), "N": n, "K": K, "P": P, **ms}
            peer = jax_product(model, x, f, V)
            if isinstance(peer, str):
                row["failed"] = peer
            else:
                errors["jax"] = float((peer[0].to(ref) - ref).abs().max() / ref.abs().max())
                assert errors["jax"] <= 1e-10, f"JAX: relative error {errors['jax']:.2e}"
                row["jax"] = peer[1] * 1e3
            floor, count = floor_s(widths, n, K, torch.float64)
            row.update(
                floor=floor * 1e3,
                products=count,
                x_floor=ms["hessext"] / (floor * 1e3),
                max_relative_error=max(errors.values()),
            )
            for name in ("jax", "torch_func"):
                if name in row:
                    row["x_" + name] = row[name] / ms["hessext"]
            rows.append(row)
            print(row, flush=True)
    columns = [
        ("net", "net", "{}"),
        ("N", "N", "{}"),
        ("K", "K", "{}"),
        ("P", "P", "{}"),
        ("hessext", "hessext.pinn_ggn_vp (ms)", "{:.2f}"),
        ("operator", "product of a built operator (ms)", "{:.2f}"),
        ("jax", "JAX jit(jvp, vjp) over folx (ms)", "{:.2f}"),
        ("torch_func", "torch.func jvp/vjp over vmap(hessian) (ms)", "{:.2f}"),
        ("floor", "floor: its products alone (ms)", "{:.2f}"),
        ("products", "products", "{}"),
        ("x_jax", "x JAX", "{:.2f}"),
        ("x_torch_func", "x torch.func", "{:.2f}"),
        ("x_floor", "hessext / floor", "{:.2f}"),
        ("max_relative_error", "max relative error", "{:.1e}"),
        ("failed", "could not run", "{}"),
    ]
    notes = [
        "G v for the loss mean((-lap u - f)^2), float64. x: the method's time over hessext.pinn_ggn_vp's "
        "(which builds the jets and the loss's derivatives in them every call, as JAX's jit recomputes its "
        "forward jets). The floor is the sum of the product's matrix products timed one by one."
    ]
    print(write("gramian_cpu", environment(), rows, columns, notes))


if __name__ == "__main__":
    main()
