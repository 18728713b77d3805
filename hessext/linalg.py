"""Spectral quantities and solves of a curvature operator (`HessianOperator`, any object with
`.shape` and `@` on [P, K] columns, or a dense symmetric tensor), every product K columns at a time.

- `eigsh`: the k extreme eigenpairs by block Lanczos with full reorthogonalisation and thick
  restarts from the most wanted Ritz vectors; converged when ||H y - theta y|| <= tol max |theta|.
- `trace`: Hutch++ (exact trace of H on a sketched range, Hutchinson on the rest; unbiased).
- `density`: stochastic Lanczos quadrature (Gaussian-smoothed nodes and weights of the Lanczos
  tridiagonals of random probes), integrating to 1 on its grid; `plot_density` draws it.
- `solve`: (H + damping I) x = b by MINRES (symmetric, indefinite Hessians) or CG (positive
  definite, e.g. a damped GGN), columns of b solved together."""

from __future__ import annotations

import math
import warnings

import torch

WHICH = ("LA", "SA", "LM")
MAX_COLUMNS = 64  # columns per operator call (bounds the K of one native call)


class _Op:
    """The operator as a function of [P, K] columns, with P, dtype and device; with progress, a tqdm
    bar counts the products (progress=None: the operator's own `progress`, else off)."""

    def __init__(self, H, progress=None, what="products"):
        if isinstance(H, torch.Tensor):
            if H.dim() != 2 or H.shape[0] != H.shape[1]:
                raise ValueError(f"H as a tensor must be a square matrix [P, P], got shape {tuple(H.shape)}")
            self._apply, self.P, self.dtype, self.device = H.__matmul__, H.shape[0], H.dtype, H.device
        else:
            shape = getattr(H, "shape", None)
            if shape is None or len(shape) != 2 or shape[0] != shape[1] or not hasattr(H, "__matmul__"):
                raise TypeError(
                    "H must be a HessianOperator, a square tensor, or an object with a square .shape "
                    f"and @ on [P, K] tensors, got {type(H).__name__}"
                )
            self._apply, self.P = H.__matmul__, int(shape[0])
            self.dtype, self.device = getattr(H, "dtype", torch.float64), getattr(H, "device", torch.device("cpu"))
        self.products = 0
        self.bar = None
        if progress or (progress is None and getattr(H, "progress", False) is True):
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=what, unit="product")

    def __call__(self, X):
        self.products += X.shape[1]
        if self.bar is not None:
            self.bar.update(X.shape[1])
        if X.shape[1] <= MAX_COLUMNS:
            return self._apply(X)
        return torch.cat([self._apply(c) for c in X.split(MAX_COLUMNS, 1)], 1)

    def randn(self, k, generator, rademacher=False):
        """[P, k] standard normal columns, or Rademacher (+-1) ones drawn as random bytes (7x faster
        than normals: 23 against 167 ms for 269322 x 33 on the CPU)."""
        if rademacher:
            bits = torch.randint(0, 2, (self.P, k), generator=generator, dtype=torch.int8)
            return bits.to(dtype=self.dtype, device=self.device).mul_(2).sub_(1)
        drawn = self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float64
        return torch.randn(self.P, k, generator=generator, dtype=drawn).to(dtype=self.dtype, device=self.device)


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _tolerance(tol, dtype):
    """The user's relative tolerance, or the default: sqrt(machine epsilon) of the operator's dtype."""
    if tol is None:
        return torch.finfo(dtype).eps ** 0.5
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a positive number or None (the dtype's default), got {tol!r}")
    return float(tol)


def _qr(W):
    """(Wq, R) with W = Wq R up to rounding, Wq's columns orthonormal: CholeskyQR2, or a thin SVD
    (Wq = U, R = S V^T) where W is near rank-deficient, dropping the directions whose singular value
    is below 1e3 eps of the largest (Wq [P, c'], R [c', c] with c' <= c). Dropping a small pivot of
    a triangular QR instead would also drop the large parts of later columns along it."""
    tiny = 1e3 * torch.finfo(W.dtype).eps
    scale = W.norm(dim=0).max() if W.shape[1] else W.new_zeros(())
    if W.shape[1] == 0 or not bool(scale > 0):
        return W[:, :0], W.new_zeros(0, W.shape[1])
    R1, info = torch.linalg.cholesky_ex(_mm(W.T, W), upper=True)
    if bool(info == 0) and bool(R1.diagonal().min() > tiny**0.5 * R1.diagonal().max()):
        Wq = torch.linalg.solve_triangular(R1, W, upper=True, left=False)
        R2 = torch.linalg.cholesky(_mm(Wq.T, Wq), upper=True)
        return torch.linalg.solve_triangular(R2, Wq, upper=True, left=False), R2 @ R1
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    keep = S > tiny * S[0]
    return U[:, keep], S[keep, None] * Vh[keep]


def _mm(A, B):
    """A @ B for the basis's tall-and-thin products (Q^T W, Q C, W^T W, the restart's S^T Q^T): on the
    CPU through hessext's BLAS, which takes either layout of a transposed view and runs these shapes
    several times faster than ATen's matmul (docs/internals.md)."""
    if A.device.type == "cpu" and A.dtype in (torch.float32, torch.float64) and A.dtype == B.dtype:
        from hessext import _native

        native = _native.load()
        if native is not None:
            return native.mm(A, B)
    return A @ B


def _orthogonalise(W, Q):
    """(W with Q's span removed; Q^T W). One projection leaves W orthogonal to Q up to about
    eps ||W before|| / ||W after||: it is repeated (at most twice more) while a column kept less than
    1e-3 of its norm. A column left with at most 1e3 eps of its norm lay in Q's span (an invariant
    subspace: the Krylov space ran out of new directions); it is zeroed, since what remains of it is
    rounding noise, orthogonal to nothing, and _qr drops it."""
    C = W.new_zeros(Q.shape[1], W.shape[1])
    if Q.shape[1]:
        first = last = W.norm(dim=0)
        C = _mm(Q.T, W)
        W = W - _mm(Q, C)
        for _ in range(2):
            now = W.norm(dim=0)
            if not bool((now < 1e-3 * last).any()):
                break
            last = now
            C2 = _mm(Q.T, W)
            W, C = W - _mm(Q, C2), C + C2
        spent = W.norm(dim=0) <= 1e3 * torch.finfo(W.dtype).eps * first
        if bool(spent.any()):
            W = W.masked_fill(spent, 0)
    return W, C


def _select(theta, which, count):
    """Indices of the `count` wanted Ritz values, most wanted first."""
    key = {"LA": -theta, "SA": theta, "LM": -theta.abs()}[which]
    return torch.argsort(key)[:count]


CRITERIA = ("residual", "values")


def eigsh(
    H,
    k: int = 6,
    *,
    which: str = "LA",
    tol: float | None = None,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
    block_size: int | None = None,
    progress: bool | None = None,
    criterion: str = "residual",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [k], vectors [P, k]): k eigenpairs of the symmetric operator H, values in descending
    order. which: "LA" largest algebraic, "SA" smallest algebraic, "LM" largest magnitude.
    tol: converged when ``||H y - theta y|| <= tol * max |theta|`` for each pair (default: the square root
    of the operator dtype's machine epsilon, 1.5e-8 for float64 and 3.5e-4 for float32, what
    products rounded in that dtype can reach). max_iter: block products
    (default enough for 100 restarts). generator: for the random start block. block_size: columns per
    product (default k). progress: a tqdm bar of the products (None: the operator's own setting).
    criterion: "residual" (the test above: accurate vectors) or "values" (converged when each value's
    error bound ``min(r, r^2 / gap) <= tol * max |theta|``, r its residual and gap its distance to the
    other Ritz values: the eigenvalues to tol at a fraction of the products, the vectors less accurate;
    what a per-epoch spectrum needs). Warns (RuntimeWarning) with the residuals if not converged.

    Block Lanczos with full reorthogonalisation: the newest block X of the basis Q is multiplied,
    C = Q^T H X is T's new column block, the remainder H X - Q C (projected again where DGKS asks)
    is the next block W R. Since H Q = Q T + W R E^T (E: the newest block's rows), the residual of a
    Ritz pair (theta, Q s) is ||R s_E||, with no pass over Q. A thick restart keeps the most wanted
    Ritz vectors Y = Q S_keep (then H Y = Y Theta + W R E^T S_keep, so T restarts diagonal and the
    next block's column holds the coupling). Each iteration reads Q twice; nothing else is stored."""
    op = _Op(H, progress, "eigsh")
    P = op.P
    k = _positive_int(k, "k")
    if k >= P:
        raise ValueError(
            f"k must be smaller than the operator's size P = {P}, got k = {k} "
            f"(for all eigenvalues use torch.linalg.eigh on the dense Hessian)"
        )
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    tol = _tolerance(tol, op.dtype)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if max_iter is not None:
        _positive_int(max_iter, "max_iter")
    b = min(_positive_int(block_size or k, "block_size"), P)
    m_max = min(P, max(6 * k + 2 * b, 40))  # basis columns before a restart
    keep = min(k + max(b, (m_max - k) // 2), m_max - b) if m_max - b > k else k  # Ritz vectors kept
    max_iter = max_iter if max_iter is not None else 100 * max(1, (m_max - keep) // b)
    Qt = torch.empty(m_max + b, P, dtype=op.dtype, device=op.device)  # the basis as rows: Q = Qt[:m].T
    T = Qt.new_zeros(m_max + b, m_max + b)
    X, _ = _qr(op.randn(b, generator))
    Qt[: X.shape[1]] = X.T
    j0, m = 0, X.shape[1]
    for iteration in range(max_iter + 1):
        W, C = _orthogonalise(op(Qt[j0:m].T), Qt[:m].T)
        T[:m, j0:m] = C
        T[j0:m, :m] = C.T
        W, R = _qr(W)
        theta, S = torch.linalg.eigh((T[:m, :m] + T[:m, :m].T) / 2)
        order = _select(theta, which, min(k, m))
        res = (R @ S[j0:m, order]).norm(dim=0) if R.numel() else theta.new_zeros(len(order))
        scale = theta.abs().max().clamp_min(torch.finfo(theta.dtype).tiny)
        done = _error_bound(res, theta, order, criterion) <= tol * scale
        if (len(order) == k and bool(done.all())) or m >= P or iteration == max_iter:
            break
        if W.shape[1] == 0:  # an invariant subspace: go on from a random direction outside it
            W, _ = _orthogonalise(op.randn(b, generator), Qt[:m].T)
            W, _ = _qr(W)
            if W.shape[1] == 0:
                break
        if m + W.shape[1] > m_max:  # thick restart
            kept = _select(theta, which, keep)
            Qt[:keep] = _mm(S[:, kept].T, Qt[:m])
            T.zero_()
            T[:keep, :keep] = torch.diag(theta[kept])
            m = keep
        c = min(W.shape[1], P - m)
        Qt[m : m + c] = W[:, :c].T
        j0, m = m, m + c
    if not bool(done.all()) and m < P:
        warnings.warn(
            f"eigsh did not converge in {max_iter} block products: relative residuals "
            f"{(res / scale).tolist()} (tol {tol})",
            RuntimeWarning,
            stacklevel=2,
        )
    values, vectors = theta[order], _mm(S[:, order].T, Qt[:m]).T
    desc = torch.argsort(values, descending=True)
    return values[desc], vectors[:, desc]


def _error_bound(res, theta, order, criterion):
    """Per wanted Ritz value: its residual, or with criterion "values" the smaller of it and the
    quadratic bound res^2 / gap (gap: the distance to the nearest other Ritz value)."""
    if criterion == "residual" or theta.numel() < 2:
        return res
    gaps = (theta[order, None] - theta[None, :]).abs()
    gaps[torch.arange(len(order)), order] = float("inf")
    return torch.minimum(res, res**2 / gaps.min(1).values.clamp_min(torch.finfo(theta.dtype).tiny))


def trace(H, *, samples: int = 100, generator: torch.Generator | None = None, progress: bool | None = None) -> float:
    """An unbiased estimate of trace(H) from `samples` products (Hutch++: samples // 3 of them sketch
    H's dominant range, whose trace is taken exactly, as many more apply H to the sketch, and the rest
    are Hutchinson's Rademacher probes of the deflated remainder; below 3, plain Hutchinson).
    progress: a tqdm bar of the products (None: the operator's own setting)."""
    op = _Op(H, progress, "trace")
    m = _positive_int(samples, "samples")
    s = m // 3
    if s >= op.P:  # as many products as the size: the exact trace from the basis
        return float(torch.diagonal(op(torch.eye(op.P, dtype=op.dtype, device=op.device))).sum())
    if s == 0:
        G = op.randn(m, generator, rademacher=True)
        return float((G * op(G)).sum() / m)
    Q, _ = _qr(op(op.randn(s, generator, rademacher=True)))
    exact = (Q * op(Q)).sum()
    g = m - 2 * s
    G = op.randn(g, generator, rademacher=True)
    G = G - _mm(Q, _mm(Q.T, G))
    return float(exact + (G * op(G)).sum() / g)


def _lanczos(op, V, steps):
    """Lanczos with full reorthogonalisation from the unit columns of V [P, c], all columns at once:
    (alpha [steps, c], beta [steps - 1, c], lengths [c]) of each column's tridiagonal."""
    P, c = V.shape
    basis = V.new_zeros(steps, P, c)
    alpha, beta = V.new_zeros(steps, c), V.new_zeros(max(steps - 1, 0), c)
    lengths = torch.full((c,), steps, dtype=torch.long)
    v = V
    for j in range(steps):
        basis[j] = v
        w = op(v)
        alpha[j] = (w * v).sum(0)
        for _ in range(2):
            w = w - torch.einsum("jpc,jc->pc", basis[: j + 1], torch.einsum("jpc,pc->jc", basis[: j + 1], w))
        if j == steps - 1:
            break
        norm = w.norm(dim=0)
        ended = (norm <= 1e3 * torch.finfo(w.dtype).eps * alpha[: j + 1].abs().amax(0).clamp_min(1)) & (
            lengths == steps
        )
        lengths[ended.cpu()] = j + 1
        beta[j] = torch.where(lengths.to(norm.device) > j + 1, norm, torch.zeros_like(norm))
        v = torch.where(beta[j] > 0, w / norm.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(w))
    return alpha, beta, lengths


def density(
    H,
    *,
    grid=None,
    num_steps=80,
    samples=10,
    sigma=None,
    generator=None,
    points=1000,
    memory_limit=2**29,
    progress=None,
):
    """(grid [points], density [points]): the spectral density of H by stochastic Lanczos quadrature:
    `samples` Rademacher probes, `num_steps` Lanczos steps each (fully reorthogonalised), the nodes
    and weights of each tridiagonal smoothed by a Gaussian of width sigma (default 1/100 of the
    spectrum's span) and averaged; normalised to integrate to 1 on the grid. grid (default `points`
    values covering the spectrum and 4 sigma on each side) is where the density is evaluated. Probes
    run together in as many columns as `memory_limit` bytes of Lanczos basis allow. progress: a tqdm
    bar of the products (None: the operator's own setting)."""
    op = _Op(H, progress, "density")
    steps = min(_positive_int(num_steps, "num_steps"), op.P)
    count = _positive_int(samples, "samples")
    per_column = steps * op.P * torch.finfo(op.dtype).bits // 8
    chunk = max(1, min(count, memory_limit // max(per_column, 1)))
    nodes, weights = [], []
    probes = op.randn(count, generator, rademacher=True)
    probes = probes / probes.norm(dim=0)
    for block in probes.split(chunk, 1):
        alpha, beta, lengths = _lanczos(op, block, steps)
        for c in range(block.shape[1]):
            n = int(lengths[c])
            T = torch.diag(alpha[:n, c]) + torch.diag(beta[: n - 1, c], 1) + torch.diag(beta[: n - 1, c], -1)
            theta, U = torch.linalg.eigh(T.double().cpu())
            nodes.append(theta)
            weights.append(U[0] ** 2 / count)
    nodes, weights = torch.cat(nodes), torch.cat(weights)
    span = float(nodes.max() - nodes.min())
    if sigma is None:
        sigma = max(span, float(nodes.abs().max()), 1e-12) / 100
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    if grid is None:
        grid = torch.linspace(
            float(nodes.min()) - 4 * sigma, float(nodes.max()) + 4 * sigma, points, dtype=torch.float64
        )
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be a 1-D increasing sequence of at least 2 values, got shape {tuple(grid.shape)}")
    z = (grid[:, None] - nodes[None, :]) / sigma
    dens = (weights[None, :] * torch.exp(-0.5 * z * z)).sum(1) / (sigma * math.sqrt(2 * math.pi))
    area = torch.trapezoid(dens, grid)
    if area > 0:
        dens = dens / area
    return grid, dens


def plot_density(grid, density, path=None, *, ax=None, title="Hessian spectral density", log=True):
    """Draw a density from `density()` (log scale by default); save to `path` when given. Returns the axes."""
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    grid, density = torch.as_tensor(grid, dtype=torch.float64), torch.as_tensor(density, dtype=torch.float64)
    floor = 1e-6 * float(density.max())  # a log scale shows six decades below the peak
    ax.plot(grid.numpy(), density.clamp_min(floor).numpy() if log else density.numpy())
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    if fig is not None:
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
            plt.close(fig)
    return ax


def solve(
    H,
    b: torch.Tensor,
    *,
    damping: float = 0.0,
    tol: float | None = None,
    max_iter: int | None = None,
    method: str = "minres",
    progress: bool | None = None,
) -> torch.Tensor:
    """x with (H + damping I) x = b, for b [P] or [P, K] (columns solved together, one product per
    iteration with all of them). method: "minres" (any symmetric H, e.g. an indefinite Hessian) or
    "cg" (H + damping I positive definite, e.g. a damped GGN). Converged when
    ||b - (H + damping I) x|| <= tol ||b|| per column (default tol: the square root of the dtype's
    machine epsilon, as in `eigsh`); warns (RuntimeWarning) if not within max_iter
    (default min(10 P, 10000)) iterations. progress: a tqdm bar of the products (None: the
    operator's own setting)."""
    op = _Op(H, progress, "solve")
    if method not in ("minres", "cg"):
        raise ValueError(f"method must be 'minres' or 'cg', got {method!r}")
    if not isinstance(b, torch.Tensor) or b.dim() not in (1, 2) or b.shape[0] != op.P:
        raise ValueError(
            f"b must be a tensor of shape [{op.P}] or [{op.P}, K], got "
            f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}"
        )
    if b.dtype != op.dtype or b.device != op.device:
        raise TypeError(f"b must be {op.dtype} on {op.device} like the operator, got {b.dtype} on {b.device}")
    tol = _tolerance(tol, op.dtype)
    if max_iter is not None:
        _positive_int(max_iter, "max_iter")
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not math.isfinite(damping):
        raise TypeError(f"damping must be a finite number, got {damping!r}")
    B = b.unsqueeze(1) if b.dim() == 1 else b
    max_iter = max_iter if max_iter is not None else min(10 * op.P, 10_000)

    def A(X):
        return op(X) + damping * X if damping else op(X)

    if method == "cg":
        X, relres, indefinite = _cg(A, B, tol, max_iter)
        if indefinite:
            warnings.warn(
                f"solve (cg): H + damping I is not positive definite (zero or negative curvature along a "
                f"search direction of {indefinite} of {B.shape[1]} columns); those columns stop at their "
                f"best iterate. Use method='minres' for a symmetric indefinite or singular H, or more "
                f"damping",
                RuntimeWarning,
                stacklevel=2,
            )
    else:
        X, relres = _minres(A, B, tol, max_iter)
    if bool((relres > tol).any()):
        warnings.warn(
            f"solve ({method}) did not reach tol {tol:.3g} in {max_iter} iterations: relative residuals "
            f"{relres.tolist()} (a singular H with b outside its range has no solution: the result is "
            f"the iterate of smallest residual)",
            RuntimeWarning,
            stacklevel=2,
        )
    return X[:, 0] if b.dim() == 1 else X


def _cg(A, B, tol, max_iter):
    """Conjugate gradients, every quantity per column. A column stops where A shows zero or negative
    curvature along its search direction (A is not positive definite there: the count is returned
    for the warning), and each column returns its iterate of smallest residual (on a singular A with
    b outside its range CG's iterates grow without bound while the residual stalls)."""
    tiny = torch.finfo(B.dtype).tiny
    X = torch.zeros_like(B)
    best, best_rs = X.clone(), (B * B).sum(0)
    R = B.clone()
    Pd = R.clone()
    bnorm = B.norm(dim=0).clamp_min(tiny)
    rs = (R * R).sum(0)
    indefinite = torch.zeros_like(rs, dtype=torch.bool)
    for _ in range(max_iter):
        active = (rs.sqrt() > tol * bnorm) & ~indefinite
        if not bool(active.any()):
            break
        AP = A(Pd)
        curv = (Pd * AP).sum(0)
        indefinite |= active & (curv <= 0)
        active &= curv > 0
        step = torch.where(active, rs / torch.where(active, curv, torch.ones_like(curv)), torch.zeros_like(rs))
        X += step * Pd
        R -= step * AP
        rs_new = (R * R).sum(0)
        Pd = R + torch.where(active, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs)) * Pd
        rs = torch.where(active, rs_new, rs)
        better = active & (rs < best_rs)
        best, best_rs = torch.where(better, X, best), torch.where(better, rs, best_rs)
    return best, (B - A(best)).norm(dim=0) / bnorm, int(indefinite.sum())


def _minres(A, B, tol, max_iter):
    """MINRES (Paige and Saunders), unpreconditioned, every quantity per column. A column stops when
    its Krylov space is exhausted (the new Lanczos norm is rounding noise, <= 100 eps ||A||) or when
    the next rotation has nothing to rotate (gamma <= 100 eps ||A||: A is singular there and b has a
    part outside its range); the iterate is then the minimum-residual one, never a step divided by
    noise. ||A|| is estimated from the tridiagonal, as in Paige and Saunders' code."""
    tiny, eps = torch.finfo(B.dtype).tiny, torch.finfo(B.dtype).eps
    beta1 = B.norm(dim=0)
    safe = beta1.clamp_min(tiny)
    X = torch.zeros_like(B)
    r1, r2, y = B.clone(), B.clone(), B.clone()
    oldb, beta, dbar, epsln, phibar = (
        torch.zeros_like(beta1),
        beta1.clone(),
        torch.zeros_like(beta1),
        torch.zeros_like(beta1),
        beta1.clone(),
    )
    cs, sn = -torch.ones_like(beta1), torch.zeros_like(beta1)
    w, w2 = torch.zeros_like(B), torch.zeros_like(B)
    tnorm2 = torch.zeros_like(beta1)
    active = beta1 > 0
    for itn in range(max_iter):
        active = active & (phibar > tol * safe) & (beta > 0)
        if not bool(active.any()):
            break
        v = y / beta.clamp_min(tiny)
        y = A(v)
        if itn >= 1:
            y = y - (beta / oldb.clamp_min(tiny)) * r1
        alfa = (v * y).sum(0)
        y = y - (alfa / beta.clamp_min(tiny)) * r2
        r1, r2 = r2, y
        oldb, beta_new = beta, y.norm(dim=0)
        tnorm2 = torch.where(active, tnorm2 + alfa**2 + oldb**2 + beta_new**2, tnorm2)
        noise = 1e2 * eps * tnorm2.sqrt()
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln_new = sn * beta_new
        dbar_new = -cs * beta_new
        gamma_raw = torch.hypot(gbar, beta_new)
        gamma = gamma_raw.clamp_min(tiny)
        cs_new, sn_new = gbar / gamma, beta_new / gamma
        phi = cs_new * phibar
        w1, w2_new = w2, w
        w_new = (v - oldeps * w1 - delta * w2_new) / gamma
        step = active & (gamma_raw > noise)
        keep = step.unsqueeze(0)
        X = torch.where(keep, X + phi * w_new, X)
        w, w2 = torch.where(keep, w_new, w), torch.where(keep, w2_new, w2)
        beta = torch.where(step, beta_new, beta)
        epsln, dbar = torch.where(step, epsln_new, epsln), torch.where(step, dbar_new, dbar)
        cs, sn = torch.where(step, cs_new, cs), torch.where(step, sn_new, sn)
        phibar = torch.where(step, sn_new * phibar, phibar)
        active = step & (beta_new > noise)
    return X, (B - A(X)).norm(dim=0) / safe
