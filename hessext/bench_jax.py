"""The JAX peer of `hessext.bench`, run in a process of its own: `python -m hessext.bench_jax IN OUT`.

IN is an .npz written by `hessext.bench` (the quantity, the Tanh MLP's weights and biases in torch's
layout, the data, the vectors, the timing budget); OUT receives the result (flattened in torch's
parameter order, for the parent's check against its float64 reference) and the timing: median and
interquartile range of blocks of calls after the first (jit compile) call, whose time is reported
apart. Each call blocks until its result is ready. The Laplacian is folx's forward Laplacian (jit of
vmap); every other quantity is plain JAX under jit: jvp of grad, its vmap for K vectors, jvp and vjp
for the GGN, jax.hessian."""
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
    """(function of no arguments that runs the quantity once, postprocess to a flat numpy array)."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    q = str(arrays["quantity"])
    params, forward = _net(arrays)
    x, y = jnp.asarray(arrays["x"]), jnp.asarray(arrays["y"])
    n_out = y.size

    def loss(p):
        return jnp.mean((forward(p, x) - y) ** 2)

    def hvp(v):
        return jax.jvp(jax.grad(loss), (params,), (v,))[1]

    flat_out = lambda tree: np.asarray(ravel_pytree(tree)[0])  # noqa: E731
    if q == "hvp":
        v = _as_params(jnp.asarray(arrays["v"]), params)
        f = jax.jit(hvp)
        return (lambda: f(v)), flat_out
    if q == "hvp-batched":
        V = jax.vmap(lambda t: _as_params(t, params))(jnp.asarray(arrays["V"]))
        f = jax.jit(jax.vmap(hvp))
        return (lambda: f(V)), flat_out  # param-major, as torch's dict of [K, *shape]
    if q == "ggn_vp":
        v = _as_params(jnp.asarray(arrays["v"]), params)

        def ggn(v):
            out, back = jax.vjp(lambda p: forward(p, x), params)
            Jv = jax.jvp(lambda p: forward(p, x), (params,), (v,))[1]
            return back(2.0 / n_out * Jv)[0]

        f = jax.jit(ggn)
        return (lambda: f(v)), flat_out
    if q in ("hessian", "diagonal"):
        theta, unravel = ravel_pytree(params)
        H = jax.hessian(lambda t: loss(unravel(t)))
        f = jax.jit((lambda t: jnp.diagonal(H(t))) if q == "diagonal" else H)
        return (lambda: f(theta)), lambda r: np.asarray(r).reshape(-1)
    if q == "input-hessian":
        def sample_loss(xm, ym):
            return jnp.sum((forward(params, xm[None]) - ym[None]) ** 2) / n_out

        f = jax.jit(jax.vmap(jax.hessian(sample_loss)))
        return (lambda: f(x, y)), lambda r: np.asarray(r).reshape(-1)
    if q == "laplacian":
        from folx import forward_laplacian

        lap = forward_laplacian(lambda xm: forward(params, xm[None])[0])
        f = jax.jit(jax.vmap(lambda xm: lap(xm).laplacian))
        return (lambda: f(x)), lambda r: np.asarray(r).reshape(-1)
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
    np.savez(dst, result=to_flat(result), compile_s=compile_s, median_s=median, iqr_s=iqr,
             version=jax.__version__)


if __name__ == "__main__":
    main(sys.argv[1:])
