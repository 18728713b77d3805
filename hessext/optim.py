"""Optimizers preconditioned by the Hessian diagonal, following torch.optim.Optimizer conventions
(param groups, state_dict, step). Each is bound to a model and loss: `step(inputs, targets)`
computes the loss, its gradient (autograd) and the diagonal (hessext), updates, and returns the loss.

The diagonal comes from `estimator`: "exact" (hessext.hessian_diag: native where the model allows),
"ggn" (hessext.ggn_diag, positive semi-definite) or "hutchinson" (hessext.hutchinson_diag with
`samples` Rademacher vectors from `generator`). An exact diagonal that the native kernels cannot
serve costs one Hessian-vector product per parameter per step; the optimizer warns once, with that
cost, before the first such step."""

import warnings

import torch

from hessext import curvature
from hessext.plan import plan as current_plan

ESTIMATORS = ("exact", "ggn", "hutchinson")


def _check_group(group, cls):
    """ValueError naming any setting of a param group that is out of range."""
    lr, betas = group["lr"], group["betas"]
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
        raise ValueError(f"{cls}: lr must be a number >= 0, got {lr!r}")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"{cls}: betas must be a pair of numbers in [0, 1), got {betas!r}")
    for name in ("eps", "weight_decay"):
        if not isinstance(group[name], (int, float)) or not group[name] >= 0:
            raise ValueError(f"{cls}: {name} must be a number >= 0, got {group[name]!r}")
    if "hessian_power" in group and not 0.0 < group["hessian_power"] <= 1.0:
        raise ValueError(f"{cls}: hessian_power must be in (0, 1], got {group['hessian_power']!r}")
    if "rho" in group and not (isinstance(group["rho"], (int, float)) and group["rho"] > 0):
        raise ValueError(f"{cls}: rho must be a number > 0, got {group['rho']!r}")
    if "update_every" in group:
        k = group["update_every"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{cls}: update_every must be an int >= 1, got {k!r}")


class _DiagonalOptimizer(torch.optim.Optimizer):
    def __init__(self, model, loss_fn, params, defaults, estimator, samples, generator):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"samples must be an int >= 1 (Rademacher vectors per step), got {samples!r}")
        super().__init__(model.parameters() if params is None else params, defaults)
        self.model, self.loss_fn = model, loss_fn
        self.estimator, self.samples, self.generator = estimator, samples, generator
        self._warned = False
        self._names = {p: name for name, p in model.named_parameters()}
        unknown = [p for g in self.param_groups for p in g["params"] if p not in self._names]
        if unknown:
            raise ValueError(f"params must be parameters of the model; {len(unknown)} are not")

    def add_param_group(self, param_group):
        names = getattr(self, "_names", None)  # None while torch.optim.Optimizer.__init__ adds the first groups
        if names is not None:
            params = param_group["params"] if isinstance(param_group, dict) else param_group
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            if any(p not in names for p in params):
                raise ValueError(
                    f"params must be parameters of the model; {sum(p not in names for p in params)} are not"
                )
            if isinstance(param_group, dict):
                param_group = dict(param_group, params=params)
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1], type(self).__name__)

    def _trainable(self, group):
        """The group's parameters that train (requires_grad), as torch.optim skips the others."""
        return [p for p in group["params"] if p.requires_grad]

    def _loss_and_grad(self, inputs, targets):
        params = [p for g in self.param_groups for p in self._trainable(g)]
        with torch.enable_grad():
            loss = self.loss_fn(self.model(inputs), targets)
            grads = torch.autograd.grad(loss, params, allow_unused=True) if params else ()
        return loss.detach(), {p: (g if g is not None else torch.zeros_like(p)) for p, g in zip(params, grads)}

    def _state(self, p, *buffers):
        """The per-parameter state, created on first use: a step count and zeroed buffers."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            for name in buffers:
                state[name] = torch.zeros_like(p)
        return state

    def _warn_basis_fallback(self):
        """Warn once when the exact estimators would take the basis fallback: P products a step."""
        if self._warned:
            return
        p = current_plan(self.model, self.loss_fn)
        why = p.ggn_reason() if self.estimator == "ggn" else p.reason
        if why is None:
            return
        self._warned = True
        P = sum(t.numel() for t in self.model.parameters())
        warnings.warn(
            f"{type(self).__name__}: estimator={self.estimator!r} has no native kernel here ({why}), so "
            f"each step computes the exact diagonal from {P} Hessian-vector products (about {P} times the "
            f"cost of one); estimator='hutchinson' estimates it from `samples` products",
            UserWarning,
            stacklevel=3,
        )

    def _diagonal(self, inputs, targets):
        if self.estimator != "hutchinson":
            self._warn_basis_fallback()
        if self.estimator == "hutchinson":
            d = curvature.hutchinson_diag(
                self.model, self.loss_fn, inputs, targets, samples=self.samples, generator=self.generator
            )
        elif self.estimator == "ggn":
            d = curvature.ggn_diag(self.model, self.loss_fn, inputs, targets)
        else:
            d = curvature.hessian_diag(self.model, self.loss_fn, inputs, targets)
        return {p: d[name] for p, name in self._names.items() if name in d}  # frozen ones are left out


# AdaHessian's defaults (lr, eps) per estimator. The reference's (0.15, 1e-4) are tuned for one-sample
# Hutchinson estimates v * Hv, whose second moment is the squared row norm sum_j H_ij^2 of H, not
# H_ii^2: the exact and GGN diagonals lack that off-diagonal mass (on an MLP for sklearn's digits
# they are about 1e-4, the size of the reference's eps), and with the reference's defaults their
# steps diverge. With (0.05, 1e-2) they train there (tests/test_optim.py).
ADAHESSIAN_DEFAULTS = {"hutchinson": (0.15, 1e-4), "exact": (0.05, 1e-2), "ggn": (0.05, 1e-2)}


class AdaHessian(_DiagonalOptimizer):
    """AdaHessian (Yao et al., 2021) on the Hessian diagonal D::

        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) D^2,
        p <- p - lr (m / (1 - b1^t)) / ((v / (1 - b2^t))^(k/2) + eps) - lr wd p   (k = hessian_power)

    lr and eps default by estimator (ADAHESSIAN_DEFAULTS): 0.05 and 1e-2 for the exact and GGN
    diagonals, the reference's 0.15 and 1e-4 for Hutchinson's estimate."""

    def __init__(
        self,
        model,
        loss_fn,
        *,
        lr=None,
        betas=(0.9, 0.999),
        eps=None,
        weight_decay=0.0,
        hessian_power=1.0,
        estimator="exact",
        samples=1,
        generator=None,
        params=None,
    ):
        if estimator in ADAHESSIAN_DEFAULTS:
            lr = ADAHESSIAN_DEFAULTS[estimator][0] if lr is None else lr
            eps = ADAHESSIAN_DEFAULTS[estimator][1] if eps is None else eps
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power)
        super().__init__(model, loss_fn, params, defaults, estimator, samples, generator)

    @torch.no_grad()
    def step(self, inputs, targets):
        loss, grads = self._loss_and_grad(inputs, targets)
        diag = self._diagonal(inputs, targets)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in self._trainable(group):
                state = self._state(p, "exp_avg", "exp_hessian_diag_sq")
                state["step"] += 1
                t = state["step"]
                state["exp_avg"].mul_(b1).add_(grads[p], alpha=1 - b1)
                state["exp_hessian_diag_sq"].mul_(b2).addcmul_(diag[p], diag[p], value=1 - b2)
                denom = (state["exp_hessian_diag_sq"] / (1 - b2**t)).pow_(group["hessian_power"] / 2).add_(group["eps"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1**t))
        return loss


class Sophia(_DiagonalOptimizer):
    """Sophia (Liu et al., 2023), clipped and diagonal-preconditioned:
    m = b1 m + (1 - b1) g;  every `update_every` steps (first step included) h = b2 h + (1 - b2) D;
    p <- p - lr wd p;  p <- p - lr clip(m / max(rho h, eps), -1, 1)."""

    def __init__(
        self,
        model,
        loss_fn,
        *,
        lr=1e-2,
        betas=(0.965, 0.99),
        rho=0.04,
        eps=1e-12,
        weight_decay=0.0,
        update_every=10,
        estimator="hutchinson",
        samples=1,
        generator=None,
        params=None,
    ):
        defaults = dict(lr=lr, betas=betas, rho=rho, eps=eps, weight_decay=weight_decay, update_every=update_every)
        super().__init__(model, loss_fn, params, defaults, estimator, samples, generator)

    @torch.no_grad()
    def step(self, inputs, targets):
        loss, grads = self._loss_and_grad(inputs, targets)
        due = []  # per group: whether its diagonal is refreshed at this step (its own update_every)
        for group in self.param_groups:
            params = self._trainable(group)
            t = self.state[params[0]]["step"] + 1 if params and self.state[params[0]] else 1
            due.append(bool(params) and (t - 1) % group["update_every"] == 0)
        diag = self._diagonal(inputs, targets) if any(due) else None
        for group, refresh in zip(self.param_groups, due):
            b1, b2 = group["betas"]
            for p in self._trainable(group):
                state = self._state(p, "exp_avg", "hessian")
                state["step"] += 1
                state["exp_avg"].mul_(b1).add_(grads[p], alpha=1 - b1)
                if refresh:
                    state["hessian"].mul_(b2).add_(diag[p], alpha=1 - b2)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                ratio = state["exp_avg"] / (group["rho"] * state["hessian"]).clamp_min(group["eps"])
                p.add_(ratio.clamp_(-1.0, 1.0), alpha=-group["lr"])
        return loss


SOLVERS = ("dense", "woodbury", "cg")


class ENGD(torch.optim.Optimizer):
    """Energy natural gradient descent for physics-informed losses (Mueller and Zeinhofer, ICML 2023).

    Each step builds the loss's Gramian G (the generalised Gauss-Newton matrix split at (u, grad_u,
    lap_u): :class:`hessext.GramianOperator` of ``terms``), solves ``(G + damping I) d = gradient`` and
    moves the parameters to ``theta - lr d``; with ``lr=None`` the step length is the best of a grid
    ``0.5^j``, j = 0 .. ``line_search_steps`` - 1, on the loss (the step is skipped where none of them
    lowers it). ``solver``: ``"dense"`` (the Gramian as a matrix, Cholesky; small nets), ``"woodbury"``
    (``(B^T B + damping I)^-1`` through the points' kernel ``B B^T``: fewer point rows than
    parameters; damping > 0), or ``"cg"`` (conjugate gradients on the products, the Gauss-Newton-CG or
    Hessian-free mode; ``max_iter`` products, a warning when it stops short of ``tol``).

    Args:
        model: the network, a module of points ``[N, d]``.
        terms: ``[(loss_fn, inputs), ...]``: ``loss_fn(u, grad_u, lap_u, inputs) -> scalar``, as in
            :class:`hessext.GramianOperator`.
        lr: a fixed step length, or None for the line search.
        damping: added to the Gramian's diagonal (>= 0).
        solver: "dense", "woodbury" or "cg".
        dims: the input features of grad_u and lap_u (None: all).
        line_search_steps: the grid's size.
        max_iter, tol: for solver="cg".

    ``step()`` returns the loss before the step; ``optimizer.last_lr`` holds the step length taken.
    """

    def __init__(
        self,
        model,
        terms,
        *,
        lr=None,
        damping=1e-10,
        solver="dense",
        dims=None,
        line_search_steps=30,
        max_iter=None,
        tol=None,
    ):
        from hessext.pinn import _check_damping, _check_terms

        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise ValueError(f"ENGD: lr must be a number > 0 or None (line search), got {lr!r}")
        damping = _check_damping(damping)
        if solver not in SOLVERS:
            raise ValueError(f"ENGD: solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "woodbury" and damping <= 0:
            raise ValueError("ENGD: solver='woodbury' needs damping > 0 (it inverts B B^T + damping I)")
        if isinstance(line_search_steps, bool) or not isinstance(line_search_steps, int) or line_search_steps < 1:
            raise ValueError(f"ENGD: line_search_steps must be an int >= 1, got {line_search_steps!r}")
        if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1):
            raise ValueError(f"ENGD: max_iter must be an int >= 1 or None, got {max_iter!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("ENGD: the model has no parameters that require grad")
        super().__init__(params, dict(lr=lr, damping=damping))
        self.model, self.terms = model, _check_terms(terms)
        self.solver, self.dims, self.line_search_steps = solver, dims, line_search_steps
        self.max_iter, self.tol = max_iter, tol
        self.last_lr = None

    def loss(self):
        """The loss (the sum of the terms) at the model's parameters now, without a gradient."""
        from hessext.hessians import value_gradient_laplacian

        with torch.no_grad():
            return sum(
                loss_fn(*value_gradient_laplacian(self.model, inputs, dims=self.dims), inputs)
                for loss_fn, inputs in self.terms
            )

    def _direction(self, G, g, damping):
        if self.solver == "dense":
            A = G.dense()
            A.diagonal().add_(damping)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) == 0:
                return torch.cholesky_solve(g[:, None], L)[:, 0]
            return torch.linalg.lstsq(A, g[:, None]).solution[:, 0]  # singular (no damping): least squares
        if self.solver == "woodbury":
            B = G.jacobian()
            K = B @ B.T
            K.diagonal().add_(damping)
            return (g - B.T @ torch.linalg.solve(K, B @ g)) / damping
        from hessext.linalg import solve

        return solve(G, g, damping=damping, method="cg", tol=self.tol, max_iter=self.max_iter)

    @torch.no_grad()
    def step(self, closure=None):
        """One energy natural gradient step; returns the loss before it."""
        from hessext.pinn import GramianOperator

        if closure is not None:
            raise ValueError("ENGD: step() takes no closure: the loss comes from the terms")
        group = self.param_groups[0]
        G = GramianOperator(self.model, self.terms, dims=self.dims)
        loss, g = G.loss, G.gradient()
        d = self._direction(G, g, group["damping"])
        params = [p for p in group["params"]]
        start = torch.cat([p.reshape(-1) for p in params])

        def move(eta):
            new = start - eta * d
            offset = 0
            for p in params:
                p.copy_(new[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

        if group["lr"] is not None:
            move(group["lr"])
            self.last_lr = group["lr"]
            return loss
        best, best_eta = loss, 0.0
        for j in range(self.line_search_steps):
            eta = 0.5**j
            move(eta)
            trial = self.loss()
            if trial < best:
                best, best_eta = trial, eta
        move(best_eta)
        self.last_lr = best_eta
        return loss
