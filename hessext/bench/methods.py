"""The methods compared: hessext, autograd double backward, torch.func eager and compiled, JAX (jit, folx) in a
process of its own, BackPACK and curvlinops; `builders()` maps (quantity, method) to a function of a Problem
that returns the call to time."""

import os
import subprocess
import sys

import torch
import torch.nn as nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import hessext
from hessext.bench import problems
from hessext.bench.problems import QUANTITIES, Skip, flat, mse


METHODS = ("hessext", "double-backward", "torch.func", "torch.compile", "jax", "backpack", "curvlinops")


def _loss_of(pb):
    return lambda p: mse(functional_call(pb.model, p, (pb.x,)), pb.y)


def _func_hvp(pb, batched):
    f, params = _loss_of(pb), pb.params
    one = lambda u: jvp(grad(f), (params,), (u,))[1]  # noqa: E731
    return (lambda: vmap(one)(pb.V)) if batched else (lambda: one(pb.v))


def _double_backward_hvp(pb, batched):
    plist = list(pb.model.parameters())

    def run():
        g = torch.autograd.grad(mse(pb.model(pb.x), pb.y), plist, create_graph=True)
        vs = list((pb.V if batched else pb.v).values())
        return torch.autograd.grad(g, plist, grad_outputs=vs, is_grads_batched=batched)

    return run


def _func_ggn_vp(pb):
    params = pb.params
    out_fn = lambda p: functional_call(pb.model, p, (pb.x,))  # noqa: E731

    def run():
        out, out_vjp = vjp(out_fn, params)
        Jv = jvp(out_fn, (params,), (pb.v,))[1]
        _, loss_hvp = vjp(grad(lambda o: mse(o, pb.y)), out)
        return out_vjp(loss_hvp(Jv)[0])[0]

    return run


def _func_flat_hessian(pb):
    params = pb.params
    shapes = [(n, p.shape, p.numel()) for n, p in params.items()]
    theta = torch.cat([p.reshape(-1) for p in params.values()])

    def f(t):
        split, start = {}, 0
        for n, shape, k in shapes:
            split[n] = t[start : start + k].reshape(shape)
            start += k
        return mse(functional_call(pb.model, split, (pb.x,)), pb.y)

    return lambda: hessian(f)(theta)


def _dense_only(pb, what):
    limit = problems.DENSE_LIMIT  # read at the call: a benchmark may raise it
    if pb.P > limit:
        raise Skip(f"{what} is dense in P = {pb.P} > {limit} parameters")


def _backpack_diag(pb):
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagHessian
    except ImportError:
        raise Skip("BackPACK not installed (pip install backpack-for-pytorch)")
    import copy

    model, loss = extend(copy.deepcopy(pb.model)), extend(nn.MSELoss())

    def run():
        model.zero_grad()
        with backpack(DiagHessian()):
            loss(model(pb.x), pb.y).backward()
        return [p.diag_h for p in model.parameters()]

    return run


def _curvlinops(pb, kind):
    try:
        import curvlinops
    except ImportError:
        raise Skip("curvlinops not installed (pip install curvlinops-for-pytorch)")
    cls = {"hvp": curvlinops.HessianLinearOperator, "ggn_vp": curvlinops.GGNLinearOperator}[kind]
    op = cls(pb.model, nn.MSELoss(), list(pb.model.parameters()), [(pb.x, pb.y)], check_deterministic=False)
    v = torch.cat([t.reshape(-1) for t in pb.v.values()]).cpu().numpy()
    return lambda: torch.as_tensor(op @ v)


class External:
    """A peer timed in a process of its own (JAX: its thread pool and allocator apart from torch's).
    run(min_run_time) -> (result, {"median_s", "iqr_s", "compile_s"})."""

    def __init__(self, module, arrays):
        self.module, self.arrays = module, arrays

    def run(self, min_run_time):
        import tempfile

        import numpy as np

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
            np.savez(src, min_run_time=min_run_time, **self.arrays)
            done = subprocess.run([sys.executable, "-m", self.module, src, dst], capture_output=True, text=True)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                raise RuntimeError(lines[-1] if lines else f"exit status {done.returncode}")
            out = np.load(dst)
            timing = {k: float(out[k]) for k in ("median_s", "iqr_s", "compile_s")}
            return torch.from_numpy(out["result"]), timing


def _jax_peer(quantity):
    """JAX (jit; folx's forward Laplacian) on the same Tanh MLP, data and vectors."""

    def builder(pb):
        import importlib.util

        if pb.x.device.type != "cpu":
            raise Skip("the JAX peer is measured on the CPU only")
        if importlib.util.find_spec("jax") is None:
            raise Skip("JAX not installed (pip install jax)")
        if quantity == "laplacian" and importlib.util.find_spec("folx") is None:
            raise Skip("folx not installed (pip install folx)")
        if quantity in ("diagonal", "hessian"):
            _dense_only(pb, "jax.hessian")
        linears = [m for m in pb.model if isinstance(m, nn.Linear)]
        arrays = {
            "quantity": quantity,
            "layers": len(linears),
            "x": pb.x,
            "y": pb.y,
            "v": flat(pb.v).to(pb.x.dtype),
            "V": torch.cat([t.reshape(t.shape[0], -1) for t in pb.V.values()], 1),
        }  # [K, P], torch's order
        for j, m in enumerate(linears):
            arrays[f"W{j}"], arrays[f"b{j}"] = m.weight, m.bias
        return External(
            "hessext.bench.jax_worker",
            {k: (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t) for k, t in arrays.items()},
        )

    return builder


def _sample_loss(pb):
    n_out = pb.y.numel()
    return lambda xm, ym: ((pb.model(xm[None]) - ym[None]) ** 2).sum() / n_out


def _compiled(build):
    def builder(pb):
        # Compile in this process: inductor's pool of compile workers goes on using the CPU after
        # the compile, which slowed the next methods' timings by up to 1.6x on 2 cores.
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        fn = build(pb)
        return torch.compile(fn)

    return builder


def _func_dense(pb, diagonal):
    _dense_only(pb, "torch.func's Hessian")
    full = _func_flat_hessian(pb)
    return (lambda: torch.diagonal(full())) if diagonal else full


def _not_applicable(method):
    def builder(pb):
        raise Skip(f"no {method} for this quantity")

    return builder


def _func_builders():
    return {
        "hvp": lambda pb: _func_hvp(pb, False),
        "hvp-batched": lambda pb: _func_hvp(pb, True),
        "ggn_vp": _func_ggn_vp,
        "diagonal": lambda pb: _func_dense(pb, True),
        "hessian": lambda pb: _func_dense(pb, False),
        "input-hessian": lambda pb: lambda: vmap(hessian(_sample_loss(pb)))(pb.x, pb.y),
        "laplacian": lambda pb: (
            lambda: torch.diagonal(vmap(jacfwd(jacrev(lambda xm: pb.model(xm[None])[0])))(pb.x), dim1=-2, dim2=-1).sum(
                -1
            )
        ),
    }


def builders():
    """quantity -> method -> builder(problem) -> callable (raising Skip where it does not apply)."""
    func = _func_builders()
    table = {
        "hvp": {
            "hessext": lambda pb: lambda: hessext.hvp(pb.model, mse, pb.x, pb.y, pb.v),
            "double-backward": lambda pb: _double_backward_hvp(pb, False),
            "curvlinops": lambda pb: _curvlinops(pb, "hvp"),
        },
        "hvp-batched": {
            "hessext": lambda pb: lambda: hessext.hvp(pb.model, mse, pb.x, pb.y, pb.V),
            "double-backward": lambda pb: _double_backward_hvp(pb, True),
        },
        "ggn_vp": {
            "hessext": lambda pb: lambda: hessext.ggn_vp(pb.model, mse, pb.x, pb.y, pb.v),
            "curvlinops": lambda pb: _curvlinops(pb, "ggn_vp"),
        },
        "diagonal": {
            "hessext": lambda pb: lambda: hessext.hessian_diag(pb.model, mse, pb.x, pb.y),
            "backpack": _backpack_diag,
        },
        "hessian": {"hessext": lambda pb: lambda: hessext.hessian(pb.model, mse, pb.x, pb.y, output="matrix")},
        # input derivatives evaluated, as the peers evaluate them (in grad mode they carry a gradient)
        "input-hessian": {
            "hessext": lambda pb: torch.no_grad()(lambda: hessext.input_hessian(pb.model, mse, pb.x, pb.y))
        },
        "laplacian": {"hessext": lambda pb: torch.no_grad()(lambda: hessext.laplacian(pb.model, pb.x))},
    }
    for q in QUANTITIES:
        table[q]["torch.func"] = func[q]
        table[q]["torch.compile"] = _compiled(func[q])
        table[q]["jax"] = _jax_peer(q)
        for m in METHODS:
            table[q].setdefault(m, _not_applicable(m))
    return table
