"""Exact Hessian-diagonal benchmark, side by side in one run (float64, 2 threads): hessext.hessian_diag
against BackPACK's DiagHessian (`pip install --no-deps backpack-for-pytorch einops unfoldNd`) and
the diagonal of torch.func's full Hessian where P is small enough to finish; one plain gradient for
scale. Agreement with BackPACK is checked first (1e-10 relative).

    python benchmarks/diag.py   ->   benchmarks/results/diag_cpu.{json,md}"""

import copy

import torch
import torch.nn as nn
from torch.func import hessian

import hessext
from common import config, environment, flat_loss, median_s, mlp, write

TORCH_FUNC_MAX_P = 2000


def backpack_diag(model, x, y, loss_fn=None):
    """BackPACK DiagHessian of loss_fn (a fresh nn.MSELoss() by default) as a function -> dict name -> diagonal."""
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    bp_model, bp_loss = extend(copy.deepcopy(model)), extend(nn.MSELoss() if loss_fn is None else loss_fn)

    def run():
        bp_model.zero_grad()
        loss = bp_loss(bp_model(x), y)
        with backpack(DiagHessian()):
            loss.backward()
        return {n: p.diag_h for n, p in bp_model.named_parameters()}

    return run


def run(name):
    label, model, x, y = config(name)
    if name == "a":  # the 1-16-1 Tanh network as nn.Sequential, which BackPACK needs; targets [N, 1]
        torch.manual_seed(0)
        model, y = mlp([1, 16, 1]).double(), y[:, None]
    loss_fn = nn.MSELoss()
    params = {k: p.detach() for k, p in model.named_parameters()}
    plist = list(model.parameters())
    P = sum(p.numel() for p in plist)

    def ours():
        return hessext.hessian_diag(model, loss_fn, x, y)

    def gradient():
        return torch.autograd.grad(loss_fn(model(x), y), plist)

    bp = backpack_diag(model, x, y)
    got, ref = ours(), bp()
    err = max(((got[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in params)
    assert err < 1e-10, err
    row = {"config": label, "P": P, "max_rel_err_vs_backpack": err}
    t = {"hessext": median_s(ours), "backpack": median_s(bp), "gradient": median_s(gradient)}
    if P <= TORCH_FUNC_MAX_P:
        f, flat = flat_loss(model, loss_fn, x, y)

        def torch_func():
            return torch.diagonal(hessian(f)(flat))

        t["torch_func"] = median_s(torch_func, min_run_time=0.5)
    row.update({f"{k}_us": v * 1e6 for k, v in t.items()})
    row["x_vs_backpack"] = t["backpack"] / t["hessext"]
    row["x_vs_torch_func"] = t["torch_func"] / t["hessext"] if "torch_func" in t else None
    row["over_gradient"] = t["hessext"] / t["gradient"]
    return row


def main():
    torch.set_num_threads(2)
    rows = [run(name) for name in ("a", "b", "c")]
    columns = [
        ("config", "config", "{}"),
        ("P", "P", "{}"),
        ("hessext_us", "hessext (us)", "{:.1f}"),
        ("backpack_us", "BackPACK DiagHessian (us)", "{:.1f}"),
        ("torch_func_us", "torch.func full Hessian (us)", "{:.1f}"),
        ("gradient_us", "one gradient (us)", "{:.1f}"),
        ("x_vs_backpack", "speed-up vs BackPACK", "{:.1f}x"),
        ("x_vs_torch_func", "speed-up vs torch.func", "{:.1f}x"),
        ("over_gradient", "hessext / gradient", "{:.2f}"),
        ("max_rel_err_vs_backpack", "max rel. diff vs BackPACK", "{:.1e}"),
    ]
    print(
        write(
            "diag_cpu",
            environment(),
            rows,
            columns,
            [
                "float64, MSE (mean); hessext is the public `hessext.hessian_diag` call. torch.func: the diagonal of",
                f"`torch.func.hessian` over the flat parameters, run only where P <= {TORCH_FUNC_MAX_P}.",
            ],
        )
    )


if __name__ == "__main__":
    main()
