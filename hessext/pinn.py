"""Gauss-Newton (Gramian) curvature of physics-informed losses.

A PINN loss is ``loss_fn(u, grad_u, lap_u, inputs) -> scalar``: any torch code that sums (or averages)
over the collocation points terms of each point's own values, u the model output ``[N, C]``, grad_u
its derivatives in the input features ``dims`` ``[N, C, k]`` and lap_u its Laplacian over them ``[N, C]``
(the layout of :func:`hessext.value_gradient_laplacian`). Split the loss at that jet e = (u, grad_u,
lap_u) of each point: with J_n the Jacobian of point n's jet in the parameters and H_n the Hessian of
the loss in it, the generalised Gauss-Newton matrix is

    G = sum_n J_n^T H_n J_n.

For the usual squared residual r(e_n) linear in the jet (Poisson: r = -lap_u - f), H_n = (2/N) r' r'^T
and G is the energy natural gradient's Gramian (2/N) J_r^T J_r.

For the stacks the kernels serve, J v is a tangent (forward-mode) pass through the jet recurrence of
csrc/jets.h, per layer with the tangents (ż, J̇z, Ṡz) of the layer's output jet:

    Linear     ż = ȧ W^T + a Ẇ^T + ḃ,   J̇z = J̇a W^T + Ja Ẇ^T,   Ṡz = Ṡa W^T + Sa Ẇ^T
    phi        ȧ = phi' ż,   J̇a_i = phi'' ż Jz_i + phi' J̇z_i,
               Ṡa = phi'' ż Sz + phi' Ṡz + phi''' ż sum_i Jz_i^2 + 2 phi'' sum_i Jz_i J̇z_i

for K vectors at once (one product per layer over all of them); H (J v) is one backward of the loss's
gradient in the jets (autograd through loss_fn) or, for several vectors or once known, each point's H_n
(C (k + 2) such backwards at once); J^T w is the jets' reverse pass (the kernels' on the CPU, op
output_jets_vjp, for all K at once). The per-point rows of J (for the diagonal, the dense Gramian, the
factor rows and the kernel) are the reverse pass run for each jet entry at every point
at once, whose per-layer gradients G_l and input jets A_l give each point's weight gradient
sum_c G_l[c, n]^T A_l[c, n]. Other models take torch.func (jvp, vjp and jacrev of the jet by
vmap(jacrev) and vmap(jacrev(jacrev)) per point)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from hessext import fallback, jets, ops
from hessext._types import Params, PinnLossFn, Tensor, Vectors
from hessext.compiled import unwrap
from hessext._memory import check as check_memory, check_max_bytes
from hessext._route import MODEL_ONLY, native_stack, route, stack_args
from hessext.inputs import check_samples, pack_vectors
from hessext.operator import columns, scipy_operator

__all__ = ["GramianOperator", "pinn_ggn_vp"]


def _derivatives3(fn, z):
    """phi'(z), phi''(z), phi'''(z) elementwise by autograd through the activation's torch function
    (zeros where a derivative no longer depends on z: the piecewise-linear rows)."""
    with torch.enable_grad():
        t = z.detach().requires_grad_()
        (d1,) = torch.autograd.grad(fn(t).sum(), t, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), t, create_graph=True, allow_unused=True)
        d3 = None
        if d2 is not None and d2.requires_grad:
            (d3,) = torch.autograd.grad(d2.sum(), t, allow_unused=True)
    zero = torch.zeros_like(z)
    return d1.detach(), (d2.detach() if d2 is not None else zero), (d3 if d3 is not None else zero)


class _StackJets:
    """The forward jets of a captured stack at rows x [M, n_0], kept per layer for the tangent and
    reverse passes: A_l, the layer's input jet [k + 2, M, n_l] (A_0 = (x, e_dims, 0)), Z_l its output jet
    (bias included) and phi', phi'', phi''' at each hidden layer's values. On the CPU the forward is
    the kernels' (op output_jets with its saved jets), elsewhere the same recurrence in torch ops."""

    def __init__(self, call, x, C, features):
        plan = call.plan
        self.weights, self.biases = stack_args(plan, call.tensors)
        self.spec, self.features, self.x = plan.spec, list(features), x
        fns = [a.fn for a in plan.stack.activations]
        k, M, L = len(features), x.shape[0], len(self.weights)
        self.k, self.L = k, L
        A0 = x.new_zeros(k + 2, M, x.shape[1])
        A0[0] = x
        A0[torch.arange(1, k + 1), :, torch.tensor(features)] = 1
        self.y = x.new_zeros(()).expand(M, C)
        if x.device.type == "cpu":
            out = ops.call("output_jets", x, self.y, self.weights, self.biases, *self.spec, 1.0, 0, self.features, True)
            self.saved = out[1:]
            self.Z = [out[1 + 2 * l] for l in range(L - 1)] + [out[0]]
            self.A = [A0] + [out[2 + 2 * l] for l in range(L - 1)]
        else:
            self.saved = None
            self.Z, self.A, self._d = [], [A0], []
            a = A0
            for l, (W, b) in enumerate(zip(self.weights, self.biases)):
                z = torch.matmul(a, W.T)
                if b is not None:
                    z[0] += b
                self.Z.append(z)
                if l < L - 1:
                    self._d.append(_derivatives3(fns[l], z[0]))
                    a = self._activate(fns[l], z, *self._d[-1][:2])
                    self.A.append(a)
        self.fns = fns
        self.jet = self.Z[-1]

    @property
    def d(self):
        """The first three derivatives of each hidden activation at its values (for the passes in torch
        ops), computed once (by the forward itself where it runs in torch ops)."""
        if not hasattr(self, "_d"):
            self._d = [_derivatives3(self.fns[l], self.Z[l][0]) for l in range(self.L - 1)]
        return self._d

    def _activate(self, fn, z, d1, d2):
        """The jet after the activation, from the jet z before it and the first two derivatives at its values."""
        k = self.k
        J = d1 * z[1 : 1 + k]
        S = d1 * z[1 + k] + d2 * (z[1 : 1 + k] ** 2).sum(0)
        return torch.cat([fn(z[0])[None], J, S[None]])

    def tangent(self, dW, db):
        """The tangent of the output jet [K, k + 2, M, C] along K directions: dW[l] [K, o_l, n_l], db[l]
        [K, o_l] or None. The kernels' (op output_jets_tangent) on the CPU."""
        if self.saved is not None:
            out = ops.output_jets_tangent(
                self.x, self.y, self.weights, self.biases, self.spec, self.features, self.saved, dW, db
            )
            return out.permute(2, 0, 1, 3)
        k, adot = self.k, None
        for l, W in enumerate(self.weights):
            zdot = torch.einsum("cmn,kon->kcmo", self.A[l], dW[l])
            if adot is not None:
                zdot = zdot + torch.matmul(adot, W.T)
            if db[l] is not None:
                zdot[:, 0] += db[l][:, None, :]
            if l == self.L - 1:
                return zdot
            d1, d2, d3 = self.d[l]
            Z = self.Z[l]
            Jz, Sz = Z[1 : 1 + k], Z[1 + k]
            z0, Jdot, Sdot = zdot[:, 0], zdot[:, 1 : 1 + k], zdot[:, 1 + k]
            adot = torch.cat(
                [
                    (d1 * z0)[:, None],
                    d2 * z0[:, None] * Jz + d1 * Jdot,
                    (d2 * z0 * Sz + d1 * Sdot + d3 * z0 * (Jz**2).sum(0) + 2 * d2 * (Jz * Jdot).sum(1))[:, None],
                ],
                1,
            )

    def reverse(self, G):
        """The reverse pass for gradients G [B, k + 2, M, C] in the output jet: per layer, from the top,
        (l, the gradient in Z_l [B, k + 2, M, o_l])."""
        k = self.k
        for l in range(self.L - 1, -1, -1):
            yield l, G
            if l == 0:
                return
            dA = torch.matmul(G, self.weights[l])
            d1, d2, d3 = self.d[l - 1]
            Z = self.Z[l - 1]
            Jz, Sz = Z[1 : 1 + k], Z[1 + k]
            g0, gJ, gS = dA[:, 0], dA[:, 1 : 1 + k], dA[:, 1 + k]
            G = torch.cat(
                [
                    (d1 * g0 + d2 * (gJ * Jz).sum(1) + gS * (d2 * Sz + d3 * (Jz**2).sum(0)))[:, None],
                    d1 * gJ + 2 * d2 * gS[:, None] * Jz,
                    (d1 * gS)[:, None],
                ],
                1,
            )

    def vjp(self, G):
        """J^T w summed over the points for K gradients G [K, k + 2, M, C]: [(dW_l [K, o, n], db_l [K, o] or
        None)] per layer. The kernels' (op output_jets_vjp) on the CPU."""
        if self.saved is not None:
            found = ops.output_jets_vjp(
                self.x, self.y, self.weights, self.biases, self.spec, self.features, self.saved, G.permute(1, 2, 0, 3)
            )
            db = iter(found[self.L :])
            return [(found[l], next(db) if b is not None else None) for l, b in enumerate(self.biases)]
        out = [None] * self.L
        for l, Gl in self.reverse(G):
            out[l] = (
                torch.einsum("bcmo,cmn->bon", Gl, self.A[l]),
                Gl[:, 0].sum(1) if self.biases[l] is not None else None,
            )
        return out

    def per_point(self, G):
        """Each point's gradient for B output gradients G [B, k + 2, M, C]: [(dW [B, M, o, n], db [B, M, o]
        or None)] per layer."""
        out = [None] * self.L
        for l, Gl in self.reverse(G):
            out[l] = (torch.einsum("bcmo,cmn->bmon", Gl, self.A[l]), Gl[:, 0] if self.biases[l] is not None else None)
        return out


class _FuncJets:
    """The same passes for any other model, by torch.func: the jet of the points x [N, d] as a function
    of the parameters (vmap over the points of jacrev and jacrev(jacrev) of the model at one point)."""

    def __init__(self, model, call, x, features):
        self.model, self.x, self.features = model, x, list(features)
        self.names = call.names
        self.params = {n: t.detach() for n, t in zip(call.plan.param_names, call.tensors)}
        self.jet = self.of(self.chosen(self.params))

    def chosen(self, params):
        return tuple(params[n] for n in self.names)

    def of(self, chosen):
        params = dict(self.params)
        params.update(zip(self.names, chosen))
        feats = self.features

        def point(xi):
            return functional_call(self.model, params, (xi[None],))[0].reshape(-1)

        u = vmap(point)(self.x)  # [N, C]
        grad_u = vmap(jacrev(point))(self.x)[:, :, feats]  # [N, C, k]
        hess = vmap(jacrev(jacrev(point)))(self.x)  # [N, C, d, d]
        lap = sum(hess[:, :, i, i] for i in feats)
        return torch.cat([u[None], grad_u.permute(2, 0, 1), lap[None]])  # [k + 2, N, C]

    def tangent(self, vecs):
        """[K, k + 2, N, C] for vecs, per chosen parameter [K, *shape]."""
        chosen = self.chosen(self.params)
        return vmap(lambda *v: jvp(self.of, (chosen,), (v,))[1])(*vecs)

    def vjp(self, G):
        """Per chosen parameter [K, *shape] for K gradients G [K, k + 2, N, C]."""
        _, pullback = vjp(self.of, self.chosen(self.params))
        return vmap(lambda g: pullback(g)[0])(G)

    def per_point(self, G):
        """[B, N, P_chosen] for B output gradients G [B, k + 2, N, C], each point's own."""
        jac = jacrev(self.of)(self.chosen(self.params))  # per parameter [k + 2, N, C, *shape]
        flat = torch.cat([j.reshape(j.shape[:3] + (-1,)) for j in jac], -1)  # [k + 2, N, C, P]
        return torch.einsum("bcnd,cndp->bnp", G, flat)


def _jet_parts(jet, out_shape):
    """(u, grad_u, lap_u) shaped like the model output, from a jet [k + 2, N, C]."""
    k = jet.shape[0] - 2
    return (
        jet[0].reshape(out_shape),
        jet[1 : 1 + k].permute(1, 2, 0).reshape(tuple(out_shape) + (k,)),
        jet[1 + k].reshape(out_shape),
    )


def _loss_gradient(loss_fn, jet, inputs, out_shape):
    """(the loss, the jet as the leaf t it is a function of, its gradient in t with the graph kept, or
    None where the loss does not depend on the jet), by autograd through loss_fn."""
    with torch.enable_grad():
        t = jet.detach().requires_grad_()
        loss = loss_fn(*_jet_parts(t, out_shape), inputs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn(u, grad_u, lap_u, inputs) must return a scalar tensor, got "
                f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}"
            )
        (g,) = torch.autograd.grad(loss, t, create_graph=True, allow_unused=True)
    return loss.detach(), t, g


def _point_hessians(g, t):
    """Each point's Hessian H [N, c, c] of the loss in its jet (c = (k + 2) C, entry (channel, output) at
    channel * C + output): one batched backward of the gradient g along the c unit directions at every
    point, and a probe supported on some points that must not reach the others; None for a loss that
    couples the points (by a batch statistic of u, say): it has no per-point Hessians."""
    cols, N, C = t.shape
    c = cols * C
    if g is None or not g.requires_grad:  # the loss is linear in the jet (or constant): no curvature
        return t.new_zeros(N, c, c)

    directions = torch.eye(c, dtype=t.dtype, device=t.device).reshape(c, cols, 1, C).expand(c, cols, N, C)
    mask = fallback.probe_rows(N, t)
    probe = torch.randn(t.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(t)
    probe = probe * mask[None, :, None].to(t.dtype)
    rows = _batched_backward(g, t, torch.cat([directions, probe[None]]))  # [c + 1, cols, N, C]
    if N > 1 and bool((rows[c][:, ~mask] != 0).any()):
        return None
    return rows[:c].permute(2, 0, 1, 3).reshape(N, c, c)


def _batched_backward(g, t, grads):
    """d(g . w)/dt for each w in grads [B, *g.shape]: one vmapped backward, or one backward each where
    the loss's ops have no batching rule."""
    try:
        (out,) = torch.autograd.grad(g, t, grads, retain_graph=True, allow_unused=True, is_grads_batched=True)
    except RuntimeError:
        found = [torch.autograd.grad(g, t, w, retain_graph=True, allow_unused=True)[0] for w in grads]
        return torch.stack([f if f is not None else torch.zeros_like(t) for f in found])
    return out if out is not None else torch.zeros_like(grads)


class _Term:
    """One term (loss_fn, inputs) of a PINN loss at the parameters as they are now: its jets, the loss
    and its per-point Hessian in the jets, and the products of the jets' Jacobian J (N points,
    P chosen parameters in named_parameters() order)."""

    def __init__(self, model, loss_fn, inputs, dims, params, backend):
        if not callable(loss_fn):
            raise TypeError(
                f"each term's loss_fn must be a callable (u, grad_u, lap_u, inputs) -> scalar, "
                f"got {type(loss_fn).__name__}"
            )
        call = route(model, MODEL_ONLY, inputs, None, params, backend, targets_needed=False)
        check_samples(inputs, "the Gramian")
        N, d = inputs.shape[0], math.prod(inputs.shape[1:])
        features = jets.check_dims(dims, d)
        self.call, self.inputs = call, inputs
        stack = native_stack(call, inputs, "the Gramian", model_output=True)
        if stack is not None:
            x, self.out_shape, C = stack
            self.passes = _StackJets(call, x, C, features)
            plan = call.plan
            where = {}
            for l, (w, b) in enumerate(zip(plan.weight_pos, plan.bias_pos)):
                where[w] = (l, 0)
                if b is not None:
                    where[b] = (l, 1)
            self.where = [where[j] for j in call.sel]
        else:
            if call.backend == "native":
                call.leave_native("the model is not a stack the kernels serve")
            self.passes = _FuncJets(model, call, inputs.reshape(N, d), features)
            self.out_shape = (N, self.passes.jet.shape[2])
            self.where = None
        self.sizes = [t.numel() for t in call.selected]
        self.shapes = [t.shape for t in call.selected]
        self.jet = self.passes.jet.detach()
        self.loss, self._t, self._g = _loss_gradient(loss_fn, self.jet, inputs, self.out_shape)
        self.g = self._g.detach() if self._g is not None else torch.zeros_like(self.jet)

    def point_hessians(self):
        """Each point's Hessian of the loss in its jet, [N, c, c], computed once; None where the loss
        couples the points."""
        if not hasattr(self, "_H"):
            self._H = _point_hessians(self._g, self._t)
        return self._H

    @property
    def H(self):
        H = self.point_hessians()
        if H is None:
            raise ValueError(
                "loss_fn couples the collocation points (a point's term depends on other points' u, grad_u or "
                "lap_u, e.g. through their mean): the Gramian's per-point rows, diagonal and dense matrix need "
                "it as a sum over points of each point's own term; write the loss as a sum or mean of per-point "
                "terms (its products G @ v need no such split)"
            )
        return H

    def loss_hvp(self, W):
        """The loss's Hessian in the jets times K directions W [K, k + 2, N, C]: for several directions, or
        once they are known, through the points' Hessians; else one backward of the loss's gradient."""
        if self._g is None or not self._g.requires_grad:
            return torch.zeros_like(W)
        K, cols, N, C = W.shape
        H = self.point_hessians() if K > 1 or hasattr(self, "_H") else None
        if H is not None:
            flat = W.permute(0, 2, 1, 3).reshape(K, N, cols * C)
            return torch.einsum("nab,knb->kna", H, flat).reshape(K, N, cols, C).permute(0, 2, 1, 3)
        if K == 1:
            (out,) = torch.autograd.grad(self._g, self._t, W[0], retain_graph=True, allow_unused=True)
            return (out if out is not None else torch.zeros_like(self._t))[None]
        return _batched_backward(self._g, self._t, W)

    @property
    def native(self):
        return self.where is not None

    def _split(self, V):
        """[K, P] -> per chosen parameter [K, *shape]."""
        return [c.reshape((V.shape[0],) + tuple(s)) for c, s in zip(V.split(self.sizes, -1), self.shapes)]

    def jvp(self, V):
        """J v for V [K, P]: [K, k + 2, N, C]."""
        vecs = self._split(V)
        if not self.native:
            return self.passes.tangent(vecs)
        p = self.passes
        dW = [V.new_zeros((V.shape[0],) + tuple(W.shape)) for W in p.weights]
        db = [None] * p.L
        for v, (l, kind) in zip(vecs, self.where):
            if kind == 0:
                dW[l] = v
            else:
                db[l] = v
        return p.tangent(dW, db)

    def vjp(self, G):
        """J^T w for K gradients G [K, k + 2, N, C] (w, in the jets' layout): [K, P]."""
        K = G.shape[0]
        if not self.native:
            return torch.cat([t.reshape(K, -1) for t in self.passes.vjp(G)], 1)
        layers = self.passes.vjp(G)
        return torch.cat([layers[l][kind].reshape(K, -1) for l, kind in self.where], 1)

    def rows(self, G):
        """Each point's J^T w for B gradients G [B, k + 2, N, C] (the same at every point): [B, N, P]."""
        if not self.native:
            return self.passes.per_point(G)
        layers = self.passes.per_point(G)
        B, N = G.shape[0], G.shape[2]
        return torch.cat([layers[l][kind].reshape(B, N, -1) for l, kind in self.where], -1)

    def ggn(self, V):
        """J^T H J v for V [K, P] (H: the loss's Hessian in the points' jets, applied by autograd): [K, P]."""
        return self.vjp(self.loss_hvp(self.jvp(V)))

    @torch.no_grad()
    def jacobian(self):
        """Each point's rows of J: [N, c, P], entry (point, channel * C + output, parameter)."""
        cols, N, C = self.jet.shape
        eye = torch.eye(cols * C, dtype=self.jet.dtype, device=self.jet.device).reshape(cols * C, cols, 1, C)
        return self.rows(eye.expand(cols * C, cols, N, C)).permute(1, 0, 2)


def _check_terms(terms):
    if isinstance(terms, tuple) and len(terms) == 2 and callable(terms[0]):
        raise TypeError(
            "terms must be a list of (loss_fn, inputs) pairs; wrap a single term in a list: [(loss_fn, inputs)]"
        )
    if not isinstance(terms, (list, tuple)) or not terms:
        raise TypeError(f"terms must be a non-empty list of (loss_fn, inputs) pairs, got {terms!r:.80}")
    for j, term in enumerate(terms):
        if not (isinstance(term, (list, tuple)) and len(term) == 2 and isinstance(term[1], torch.Tensor)):
            raise TypeError(
                f"terms[{j}] must be a (loss_fn, inputs) pair with inputs a tensor [N, d], got {term!r:.80}"
            )
    return list(terms)


def _check_damping(damping):
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    return float(damping)


class GramianOperator:
    """G = GramianOperator(model, terms): the generalised Gauss-Newton matrix (the energy natural
    gradient's Gramian, for squared residuals) of a physics-informed loss, as a linear operator.

    The loss is the sum of the terms: ``terms`` is a list of ``(loss_fn, inputs)``, e.g. the interior,
    the boundary and the initial condition, each with its own points ``[N, d]``; ``loss_fn(u, grad_u,
    lap_u, inputs)`` returns the term, a sum or mean over the points of each point's own values (u
    ``[N, C]``, grad_u ``[N, C, k]`` over the features ``dims``, lap_u ``[N, C]`` over them, as
    :func:`hessext.value_gradient_laplacian` gives them). The operator is taken at the parameters and
    points as they are when it is built (one forward pass of the jets per term); a product after they
    change raises (build a new one, as :class:`hessext.optim.ENGD` does every step).

    ``G @ v`` for v ``[P]`` or ``[P, K]`` (P: the parameters that require grad, or those named in
    ``params``, flattened in ``model.named_parameters()`` order), ``shape``, ``to_scipy()``; it works with
    :func:`hessext.linalg.solve`, :func:`hessext.linalg.eigsh` and :func:`hessext.linalg.trace`.
    ``damping`` adds ``damping * I``. Also: ``diagonal()``, ``dense()``, ``jacobian()`` (factor rows
    B with ``G = B^T B``), ``kernel()`` (``B B^T``), ``loss`` and ``gradient()`` (the loss and its gradient).

    Example:
        >>> import torch, torch.nn as nn, hessext
        >>> model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        >>> x = torch.rand(64, 2, dtype=torch.float64)
        >>> f = torch.ones(64, 1, dtype=torch.float64)
        >>> def interior(u, grad_u, lap_u, inputs):
        ...     return ((-lap_u - f) ** 2).mean()
        >>> G = hessext.GramianOperator(model, [(interior, x)], damping=1e-8)
        >>> G.shape
        (65, 65)
        >>> bool(torch.allclose(G.dense() @ G.gradient(), G @ G.gradient()))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        terms: Sequence[tuple[PinnLossFn, Tensor]],
        *,
        dims: Sequence[int] | None = None,
        damping: float = 0.0,
        params: Params = None,
        backend: str = "auto",
        max_bytes: int | None = None,
    ):
        check_max_bytes(max_bytes)
        self.damping = _check_damping(damping)
        model = unwrap(model)
        with torch.no_grad():
            self._terms = [
                _Term(model, loss_fn, inputs, dims, params, backend) for loss_fn, inputs in _check_terms(terms)
            ]
        first = self._terms[0].call
        P = sum(self._terms[0].sizes)
        self.shape = (P, P)
        self.dtype, self.device = first.selected[0].dtype, first.selected[0].device
        self.max_bytes = max_bytes
        self._versions = self._state()

    def __repr__(self):
        return (
            f"GramianOperator(terms={len(self._terms)}, shape={self.shape}, damping={self.damping}, "
            f"dtype={self.dtype}, native={all(t.native for t in self._terms)})"
        )

    def _state(self):
        seen = [t for term in self._terms for t in (*term.call.tensors, term.inputs)]
        return [(t.data_ptr(), t._version) for t in seen]

    def _check_current(self):
        if self._state() != self._versions:
            raise ValueError(
                "the model's parameters or the points changed since this GramianOperator was built; "
                "build a new one at the new parameters"
            )

    @property
    def loss(self):
        """The loss (the sum of the terms) at the operator's parameters."""
        return sum(t.loss for t in self._terms)

    @torch.no_grad()
    def gradient(self):
        """The loss's gradient in the parameters, [P] (one reverse pass of the jets per term)."""
        self._check_current()
        return sum(t.vjp(t.g[None])[0] for t in self._terms)

    @torch.no_grad()
    def matmul(self, v):
        """G v for v [P] or [P, K] (K columns; all of them in one tangent pass per term)."""
        V = columns(self, v)
        self._check_current()
        out = sum(t.ggn(V) for t in self._terms)
        if self.damping:
            out = out + self.damping * V
        return out[0] if v.dim() == 1 else out.t()

    __matmul__ = matmul

    def _jacobian_bytes(self, what, extra=0):
        es = torch.empty((), dtype=self.dtype).element_size()
        rows = sum(t.jet.shape[1] * t.jet.shape[0] * t.jet.shape[2] for t in self._terms)
        widest = max(max(W.numel() for W in t.passes.weights) if t.native else 1 for t in self._terms)
        nbytes = int((rows * self.shape[0] * 2 + extra) * es * 1.2 + rows * widest * es)
        check_memory(
            f"GramianOperator.{what}() with {rows} point rows x {self.shape[0]} parameters",
            nbytes,
            self._terms[0].inputs,
            self.max_bytes,
            "use fewer points, or the products (G @ v)",
        )

    def _factors(self):
        """Per term, the factor rows (B+, B-) with the term's Gramian = B+^T B+ - B-^T B-: per point and
        eigenpair (lambda, q) of its H_n, the row sqrt(|lambda|) q^T J_n, by sign; one reverse pass per
        eigenvalue index that is nonzero at some point (a squared residual: one pass, one row per point
        in B+, none in B-)."""
        self._check_current()
        for t in self._terms:
            cols, N, C = t.jet.shape
            lam, Q = torch.linalg.eigh(t.H)  # [N, c] ascending, [N, c, c]
            tol = lam.abs().amax().clamp_min(torch.finfo(lam.dtype).tiny) * lam.shape[-1] * torch.finfo(lam.dtype).eps
            pos, neg = [], []
            for j in range(lam.shape[1]):
                for mask, out in ((lam[:, j] > tol, pos), (lam[:, j] < -tol, neg)):
                    if bool(mask.any()):
                        G = Q[:, :, j] * lam[:, j].abs().sqrt()[:, None]  # [N, c]: each point its own
                        out.append(t.rows(G.reshape(N, cols, C).permute(1, 0, 2)[None])[0][mask])
            empty = t.jet.new_zeros(0, self.shape[0])
            yield (torch.cat(pos) if pos else empty), (torch.cat(neg) if neg else empty)

    @torch.no_grad()
    def diagonal(self):
        """The exact diagonal of G (plus the damping), [P]."""
        self._jacobian_bytes("diagonal")
        return sum((pos * pos).sum(0) - (neg * neg).sum(0) for pos, neg in self._factors()) + self.damping

    @torch.no_grad()
    def dense(self):
        """G as a dense [P, P] matrix (plus the damping), refused up front past the memory available."""
        self._jacobian_bytes("dense", self.shape[0] ** 2)
        G = sum(pos.T @ pos - neg.T @ neg for pos, neg in self._factors())
        G = (G + G.T) / 2
        if self.damping:
            G.diagonal().add_(self.damping)
        return G

    def jacobian(self):
        """Factor rows B [R, P] with G = B^T B (the damping apart): per point, the rows sqrt(lambda) q^T J_n
        for each positive eigenvalue lambda of its H_n (one row per point for a squared residual: the
        residual's Jacobian, scaled). Raises where an H_n has a negative eigenvalue (G is then not a Gram
        matrix)."""
        self._jacobian_bytes("jacobian")
        rows = []
        for pos, neg in self._factors():
            if neg.shape[0]:
                raise ValueError(
                    "a point's Hessian of the loss in (u, grad_u, lap_u) has a negative eigenvalue: the "
                    "Gramian is not B^T B for real rows B (use dense() or the products)"
                )
            rows.append(pos)
        return torch.cat(rows)

    @torch.no_grad()
    def kernel(self):
        """B B^T [R, R] for the factor rows B of jacobian(): the sample-space kernel (Woodbury form)."""
        B = self.jacobian()
        return B @ B.T

    def to_scipy(self):
        """A scipy.sparse.linalg.LinearOperator (float64 numpy in and out)."""
        return scipy_operator(self)


def pinn_ggn_vp(
    model: nn.Module,
    loss_fn: PinnLossFn,
    inputs: Tensor,
    vectors: Vectors,
    *,
    dims: Sequence[int] | None = None,
    params: Params = None,
    backend: str = "auto",
) -> Vectors:
    """Generalised Gauss-Newton-vector products of a physics-informed loss, split at (u, grad_u, lap_u).

    Args:
        model: an ``nn.Module`` of points ``[N, d]``; the Linear/activation stacks the kernels serve
            take one jet pass, a tangent pass for all vectors and the jets' reverse pass; any other
            model, torch.func.
        loss_fn: ``(u, grad_u, lap_u, inputs) -> scalar``, a sum or mean over the points of each point's
            own terms (see :class:`hessext.GramianOperator`).
        inputs: the collocation points ``[N, d]``.
        vectors: as in :func:`hessext.hvp` (a dict, a list in ``named_parameters()`` order or a flat
            tensor; a leading K for K products at once).
        dims: the input features of grad_u and of the Laplacian (None: all).
        params, backend: as in :func:`hessext.hvp`.

    Returns:
        G v in the structure, shapes and dtype of ``vectors`` (detached).
    """
    term = _Term(unwrap(model), loss_fn, inputs, dims, params, backend)
    vecs, batched, restore = pack_vectors(vectors, term.call.names, term.call.selected)
    V = torch.cat([v.reshape((v.shape[0] if batched else 1, -1)) for v in vecs], -1)
    out = term.ggn(V.detach())
    parts = [o.reshape((out.shape[0],) + tuple(s)) for o, s in zip(out.split(term.sizes, -1), term.shapes)]
    return restore(parts if batched else [p[0] for p in parts])
