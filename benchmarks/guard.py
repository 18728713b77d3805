"""What the per-call trust check costs (float64, 2 threads): `hessext.plan(model, loss)` when the cache
hits (the guard re-reads every module's attributes, parameters, children and hooks, and the loss key),
against the whole public hessext.hvp call and the first call's capture.

    python benchmarks/guard.py   ->   benchmarks/results/guard_cpu.{json,md}"""

import importlib
import time

import torch
import torch.nn as nn

import hessext
from common import config, environment, median_s, write


def explicit_mse(out, target):
    return ((out - target) ** 2).mean()


def run(name):
    label, model, x, y = config(name)
    loss = explicit_mse if name == "a" else nn.MSELoss()
    v = [torch.randn_like(p) for p in model.parameters()]
    start = time.perf_counter()
    hessext.plan(model, loss)
    capture_s = time.perf_counter() - start
    entry = importlib.import_module("hessext.plan")._cache[model]  # the module, not the function hessext.plan
    guard_s = median_s(lambda: entry.state.matches())
    plan_s = median_s(lambda: hessext.plan(model, loss))
    fresh_loss_s = median_s(
        lambda: hessext.plan(model, nn.MSELoss() if name != "a" else (lambda o, t: explicit_mse(o, t)))
    )
    hvp_s = median_s(lambda: hessext.hvp(model, loss, x, y, v))
    modules = sum(1 for _ in model.modules())
    return {
        "config": label,
        "modules": modules,
        "capture_us": capture_s * 1e6,
        "guard_us": guard_s * 1e6,
        "plan_us": plan_s * 1e6,
        "fresh_loss_us": fresh_loss_s * 1e6,
        "hvp_us": hvp_s * 1e6,
        "share": plan_s / hvp_s,
    }


def main():
    torch.set_num_threads(2)
    rows = [run(name) for name in ("a", "b", "c")]
    columns = [
        ("config", "network, N", "{}"),
        ("modules", "modules", "{}"),
        ("capture_us", "first call's capture (us)", "{:.0f}"),
        ("guard_us", "guard check (us)", "{:.2f}"),
        ("plan_us", "plan() on a hit (us)", "{:.2f}"),
        ("fresh_loss_us", "plan() with a new loss object (us)", "{:.2f}"),
        ("hvp_us", "whole hessext.hvp (us)", "{:.1f}"),
        ("share", "plan / hvp", "{:.3f}"),
    ]
    print(
        write(
            "guard_cpu",
            environment(),
            rows,
            columns,
            [
                "The guard re-reads, per module, its type and class forward, its attribute names and values,",
                "its parameters, children and buffers and whether it has hooks; then the parameter dtypes,",
                "the global hooks and the globals a user-defined forward names, comparing each object as it",
                "reads it, in C (csrc/guard.h). A new loss object per call",
                "(nn.MSELoss() or a lambda) is keyed by its settings or code and closure, so it does not re-trace.",
            ],
        )
    )


if __name__ == "__main__":
    main()
