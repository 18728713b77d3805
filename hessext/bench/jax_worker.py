"""The JAX peer of `hessext.bench`, run in a process of its own: `python -m hessext.bench.jax_worker IN OUT`.

IN is an .npz written by `hessext.bench` (the quantity, the Tanh MLP's weights and biases in torch's
layout, the data, the vectors, the timing budget); OUT receives the result (flattened in torch's
parameter order, for the parent's check against its float64 reference) and the timing: median and
interquartile range of blocks of calls after the first (jit compile) call, whose time is reported
apart. Each call blocks until its result is ready. The Laplacian is folx's forward Laplacian (jit of
vmap), the PINN step jax.grad of a loss over it and the PINN Gramian's product jax.jvp and jax.vjp
over it; every other quantity is plain JAX under jit: jvp
of grad, its vmap for K vectors, jvp and vjp for the GGN, jax.hessian."""

import sys
import time

import numpy as np

TIMED_BLOCK_S = 0.002  # calls per timed block: enough for the block to take this long


def _net(arrays):
    import jax.numpy as jnp

    L = int(arrays["layers"])
    params = [(jnp.asarray(arrays[f"W{j}"]), jnp.asarray(arrays[f"b{j}"])) for j in range(L)]

    def forward(p, x):
        for j, (W, b) in enumerate(p):
            x = x @ W.T + b
            if j < L - 1:
                x = jnp.tanh(x)
        return x

    return params, forward


def _as_params(flat, like):
    """One flat vector (torch's order: W0, b0, W1, ...) as the pytree of `like` (or [K] of them)."""
    from jax.flatten_util import ravel_pytree

    _, unravel = ravel_pytree(like)
    return unravel(flat)


def build(arrays):
    """(function of no arguments that runs the quantity once, postprocess to a flat numpy array).
    The weights, data and vectors are arguments of the jitted function, never closed-over
    constants: XLA would otherwise fold the forward pass into the compiled program, which a
    training loop (new weights every step) cannot do."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    q = str(arrays["quantity"])
    params, forward = _net(arrays)
    x, y = jnp.asarray(arrays["x"]), jnp.asarray(arrays["y"])
    n_out = y.size

    def loss(p, x, y):
        return jnp.mean((forward(p, x) - y) ** 2)

    def hvp(p, x, y, v):
        return jax.jvp(lambda t: jax.grad(loss)(t, x, y), (p,), (v,))[1]

    flat_out = lambda tree: np.asarray(ravel_pytree(tree)[0])  # noqa: E731 (param-major for [K] trees too)
    if q == "hvp":
        f, v = jax.jit(hvp), _as_params(jnp.asarray(arrays["v"]), params)
        return (lambda: f(params, x, y, v)), flat_out
    if q == "hvp-batched":
        V = jax.vmap(lambda t: _as_params(t, params))(jnp.asarray(arrays["V"]))
        f = jax.jit(jax.vmap(hvp, in_axes=(None, None, None, 0)))
        return (lambda: f(params, x, y, V)), flat_out
    if q == "ggn_vp":

        def ggn(p, x, v):
            out, back = jax.vjp(lambda t: forward(t, x), p)
            Jv = jax.jvp(lambda t: forward(t, x), (p,), (v,))[1]
            return back(2.0 / n_out * Jv)[0]

        f, v = jax.jit(ggn), _as_params(jnp.asarray(arrays["v"]), params)
        return (lambda: f(params, x, v)), flat_out
    if q in ("hessian", "diagonal"):
        theta, unravel = ravel_pytree(params)
        H = jax.hessian(lambda t, x, y: loss(unravel(t), x, y))
        f = jax.jit((lambda t, x, y: jnp.diagonal(H(t, x, y))) if q == "diagonal" else H)
        return (lambda: f(theta, x, y)), lambda r: np.asarray(r).reshape(-1)
    if q == "input-hessian":

        def sample_loss(p, xm, ym):
            return jnp.sum((forward(p, xm[None]) - ym[None]) ** 2) / n_out

        f = jax.jit(jax.vmap(jax.hessian(sample_loss, argnums=1), in_axes=(None, 0, 0)))
        return (lambda: f(params, x, y)), lambda r: np.asarray(r).reshape(-1)
    if q == "laplacian":
        from folx import forward_laplacian

        def lap(p, xm):
            return forward_laplacian(lambda t: forward(p, t[None])[0])(xm).laplacian

        f = jax.jit(jax.vmap(lap, in_axes=(None, 0)))
        return (lambda: f(params, x)), lambda r: np.asarray(r).reshape(-1)
    if q == "pinn-step":  # the gradient in every weight of mean((-lap u - f)^2), y holding f
        from folx import forward_laplacian

        def pinn_loss(p, x, f):
            lap = jax.vmap(lambda xm: forward_laplacian(lambda t: forward(p, t[None])[0])(xm).laplacian)(x)
            return jnp.mean((-lap - f) ** 2)

        g = jax.jit(jax.grad(pinn_loss))
        return (lambda: g(params, x, y)), flat_out
    if q in ("pinn-gramian", "pinn-gramian-batched"):  # the Gauss-Newton product of mean((-lap u - f)^2)
        from folx import forward_laplacian

        def laplacians(p, x):
            return jax.vmap(lambda xm: forward_laplacian(lambda t: forward(p, t[None])[0])(xm).laplacian)(x)

        def gramian(p, x, v):
            Jv = jax.jvp(lambda t: laplacians(t, x), (p,), (v,))[1]
            _, back = jax.vjp(lambda t: laplacians(t, x), p)
            return back(2.0 / Jv.size * Jv)[0]

        if q == "pinn-gramian":
            f, v = jax.jit(gramian), _as_params(jnp.asarray(arrays["v"]), params)
            return (lambda: f(params, x, v)), flat_out
        V = jax.vmap(lambda t: _as_params(t, params))(jnp.asarray(arrays["V"]))
        f = jax.jit(jax.vmap(gramian, in_axes=(None, None, 0)))
        return (lambda: f(params, x, V)), flat_out
    raise ValueError(f"quantity {q!r} has no JAX peer")


def timed(fn, min_run_time):
    """(first-call seconds, median per-call seconds, interquartile range): blocks of calls until
    min_run_time has passed."""
    import jax

    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn())
    one = max(time.perf_counter() - start, 1e-7)
    number = max(1, int(TIMED_BLOCK_S / one))
    times, spent = [], 0.0
    while spent < min_run_time or len(times) < 5:
        start = time.perf_counter()
        for _ in range(number):
            jax.block_until_ready(fn())
        block = time.perf_counter() - start
        spent += block
        times.append(block / number)
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return result, compile_s, float(med), float(q3 - q1)


def main(argv):
    src, dst = argv
    arrays = dict(np.load(src, allow_pickle=False))
    import jax

    jax.config.update("jax_enable_x64", True)
    fn, to_flat = build(arrays)
    result, compile_s, median, iqr = timed(fn, float(arrays["min_run_time"]))
    np.savez(dst, result=to_flat(result), compile_s=compile_s, median_s=median, iqr_s=iqr, version=jax.__version__)


if __name__ == "__main__":
    main(sys.argv[1:])
