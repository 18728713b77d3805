"""Full-Hessian benchmark, side by side in one run (float64, 2 threads).

Weights: hessext.hessian(output="matrix") against torch.func.hessian over the flat parameters and
a forum thread's row-by-row autograd loop (one backward pass per row of the Hessian); equality to 1e-10
relative checked first. Inputs ([2,50,50,50,1], N=1024): hessext.laplacian and
hessext.input_hessian(diagonal=True) against the torch.func way (vmap over samples of
jacfwd(jacrev) of the model output, and of torch.func.hessian of each sample's loss term).

    python benchmarks/hessians.py   ->   benchmarks/results/hessians_cpu.{json,md}"""

import time

import torch
from torch.func import hessian, jacfwd, jacrev, vmap

import hessext
from common import config, environment, flat_loss, median_s, write


def mse(out, target):
    return ((out - target) ** 2).mean()


def once_s(fn):
    """Seconds of one call (for the methods that take seconds; the correctness run warmed them up)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def row_by_row(model, x, y):
    """The 1-16-1 network's first snippet: one autograd.grad call per row of the Hessian."""
    params = list(model.parameters())
    loss = mse(model(x), y)
    grads = torch.autograd.grad(loss, params, retain_graph=True, create_graph=True)
    flat = torch.cat([g.flatten() for g in grads])
    H = torch.zeros(flat.shape[0], flat.shape[0], dtype=flat.dtype)
    for idx in range(flat.shape[0]):
        second = torch.autograd.grad(flat[idx], params, retain_graph=True)
        H[idx] = torch.cat([g.flatten() for g in second])
    return H


def weights_row(name):
    label, model, x, y = config(name)
    f, theta = flat_loss(model, mse, x, y)
    ours = lambda: hessext.hessian(model, mse, x, y, output="matrix")  # noqa: E731
    theirs = lambda: hessian(f)(theta)  # noqa: E731
    loop = lambda: row_by_row(model, x, y)  # noqa: E731
    start = time.perf_counter()
    H_ref = theirs()
    t_func = time.perf_counter() - start
    H, H_loop = ours(), loop()
    scale = H_ref.abs().max()
    err = max(((H - H_ref).abs().max() / scale).item(), ((H_loop - H_ref).abs().max() / scale).item())
    assert err < 1e-10 and torch.equal(H, H.T), err
    fast = H.shape[0] < 1000
    t = {
        "hessext": median_s(ours),
        "torch_func": median_s(theirs) if fast else t_func,
        "row_loop": median_s(loop) if fast else once_s(loop),
    }
    row = {"config": label, "P": H.shape[0], "max_rel_err": err}
    row.update({f"{k}_ms": v * 1e3 for k, v in t.items()})
    row["x_vs_torch_func"] = t["torch_func"] / t["hessext"]
    row["x_vs_row_loop"] = t["row_loop"] / t["hessext"]
    return row


def inputs_rows():
    label, model, x, y = config("b")
    N = x.shape[0]

    def sample_loss(xm, ym):
        return ((model(xm[None]) - ym[None]) ** 2).sum() / y.numel()

    lap_ours = torch.no_grad()(lambda: hessext.laplacian(model, x))  # evaluated, without a gradient
    lap_func = lambda: torch.diagonal(vmap(jacfwd(jacrev(lambda xm: model(xm[None])[0])))(x), dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    ih_ours = torch.no_grad()(lambda: hessext.input_hessian(model, mse, x, y, diagonal=True))
    ih_func = lambda: torch.diagonal(vmap(hessian(sample_loss))(x, y), dim1=-2, dim2=-1)  # noqa: E731
    rows = []
    for what, ours, theirs in (("laplacian", lap_ours, lap_func), ("input_hessian(diagonal=True)", ih_ours, ih_func)):
        a, b = ours(), theirs()
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-10, (what, err)
        t_ours, t_func = median_s(ours), median_s(theirs)
        rows.append(
            {
                "config": f"{what}, {label}",
                "N": N,
                "hessext_ms": t_ours * 1e3,
                "torch_func_ms": t_func * 1e3,
                "x_vs_torch_func": t_func / t_ours,
                "max_rel_err": err,
            }
        )
    return rows


def main():
    torch.set_num_threads(2)
    env = environment()
    weights = [weights_row(name) for name in ("a", "d", "b")]
    text = write(
        "hessians_cpu",
        env,
        weights,
        [
            ("config", "config", "{}"),
            ("P", "P", "{}"),
            ("hessext_ms", "hessext (ms)", "{:.2f}"),
            ("torch_func_ms", "torch.func.hessian (ms)", "{:.1f}"),
            ("row_loop_ms", "row-by-row autograd (ms)", "{:.1f}"),
            ("x_vs_torch_func", "speed-up vs torch.func", "{:.1f}x"),
            ("x_vs_row_loop", "speed-up vs row loop", "{:.1f}x"),
            ("max_rel_err", "max rel. error", "{:.1e}"),
        ],
        [
            'float64; `hessext.hessian(..., output="matrix")`, exactly symmetric. Where P > 1000, torch.func and',
            "the row loop are timed once (each call takes seconds); every other time is a median.",
        ],
    )
    print(text)
    print(
        write(
            "input_derivatives_cpu",
            env,
            inputs_rows(),
            [
                ("config", "quantity", "{}"),
                ("hessext_ms", "hessext (ms)", "{:.3f}"),
                ("torch_func_ms", "torch.func (ms)", "{:.3f}"),
                ("x_vs_torch_func", "speed-up", "{:.1f}x"),
                ("max_rel_err", "max rel. error", "{:.1e}"),
            ],
            [
                "float64. torch.func: vmap over samples of jacfwd(jacrev(model)) (Laplacian: trace of each output's",
                "input Hessian) and of torch.func.hessian of each sample's loss term (diagonal taken).",
            ],
        )
    )


if __name__ == "__main__":
    main()
