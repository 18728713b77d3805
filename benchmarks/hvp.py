"""HVP benchmark, side by side in one run (float64, 2 threads): the public hessext.hvp call as a
user makes it, against torch.func jvp(grad) on an explicit MSE, autograd double backward, vmap
of the torch.func HVP over K=16 vectors, and one plain autograd gradient. Correctness first.

    python benchmarks/hvp.py   ->   benchmarks/results/hvp_cpu.{json,md}"""

import torch
from torch.func import functional_call, grad, jvp, vmap

import hessext
from common import config, environment, median_s, write


def explicit_mse(out, target):
    return ((out - target) ** 2).mean()


def run(name, K=16):
    label, model, x, y = config(name)
    params = {k: p.detach() for k, p in model.named_parameters()}
    plist = list(model.parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}
    V = {k: torch.randn((K,) + p.shape, dtype=p.dtype) for k, p in params.items()}

    def f(p):
        return explicit_mse(functional_call(model, p, (x,)), y)

    def func_hvp():
        return jvp(grad(f), (params,), (v,))[1]

    def func_vmap():
        return vmap(lambda u: jvp(grad(f), (params,), (u,))[1])(V)

    def double_backward():
        g = torch.autograd.grad(explicit_mse(model(x), y), plist, create_graph=True)
        return torch.autograd.grad(g, plist, grad_outputs=list(v.values()))

    def gradient():
        return torch.autograd.grad(explicit_mse(model(x), y), plist)

    def ours():
        return hessext.hvp(model, explicit_mse, x, y, v)

    def ours_k():
        return hessext.hvp(model, explicit_mse, x, y, V)

    assert hessext.plan(model, explicit_mse).backend == "native"
    ref, got = func_hvp(), ours()
    err = max(((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-300)).item() for k in params)
    refk, gotk = func_vmap(), ours_k()
    errk = max(((gotk[k] - refk[k]).abs().max() / refk[k].abs().max().clamp_min(1e-300)).item() for k in params)
    assert err < 1e-10 and errk < 1e-10, (err, errk)
    t = {
        key: median_s(fn)
        for key, fn in [
            ("hessext", ours),
            ("torch_func", func_hvp),
            ("double_backward", double_backward),
            ("gradient", gradient),
            ("hessext_k16", ours_k),
            ("vmap_k16", func_vmap),
        ]
    }
    row = {"config": label, "P": sum(p.numel() for p in params.values()), "max_rel_err": max(err, errk)}
    row.update({f"{k}_us": s * 1e6 for k, s in t.items()})
    row["x_vs_torch_func"] = t["torch_func"] / t["hessext"]
    row["x_vs_double_backward"] = t["double_backward"] / t["hessext"]
    row["over_gradient"] = t["hessext"] / t["gradient"]
    row["k16_x_vs_vmap"] = t["vmap_k16"] / t["hessext_k16"]
    return row


def main():
    torch.set_num_threads(2)
    rows = [run(name) for name in ("a", "b", "c")]
    columns = [
        ("config", "config", "{}"),
        ("P", "P", "{}"),
        ("hessext_us", "hessext K=1 (us)", "{:.1f}"),
        ("torch_func_us", "torch.func jvp(grad) (us)", "{:.1f}"),
        ("double_backward_us", "double backward (us)", "{:.1f}"),
        ("gradient_us", "one gradient (us)", "{:.1f}"),
        ("x_vs_torch_func", "speed-up vs torch.func", "{:.1f}x"),
        ("x_vs_double_backward", "speed-up vs double backward", "{:.1f}x"),
        ("over_gradient", "hessext / gradient", "{:.2f}"),
        ("hessext_k16_us", "hessext K=16 (us)", "{:.1f}"),
        ("vmap_k16_us", "vmap torch.func K=16 (us)", "{:.1f}"),
        ("k16_x_vs_vmap", "K=16 speed-up vs vmap", "{:.1f}x"),
        ("max_rel_err", "max rel. error", "{:.1e}"),
    ]
    print(
        write(
            "hvp_cpu",
            environment(),
            rows,
            columns,
            ["float64; hessext is the public `hessext.hvp` call (capture cached, argument checks included)."],
        )
    )


if __name__ == "__main__":
    main()
