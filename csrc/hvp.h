// Batched Hessian-vector products of a loss through a Linear/activation stack, by Pearlmutter's
// R-operator, R(.) = d/dr (.)(theta + r v) at r = 0, for K vectors v = (V_l, vb_l) at once.
// Indices as in stack.h; R-quantities carry the vector index k in the middle: [M, K, width], so
// that each product below is one GEMM over all K vectors, except the two of delta_l with a per-vector
// operand (delta_l^T Ra_l, delta_l V_l), one batched GEMM on views, no copies. The CUDA kernels run it
// on these tensors; the CPU runs the same recurrence on raw rows (cpu/hvp.cpp: hvp_rows), where each
// ATen view here would be a dispatched op.
//
//   R-forward   Rz_l = Ra_l W_l^T + a_l V_l^T + vb_l           (Ra_0 = 0; vb_l added in the next step's pass)
//               Ra_{l+1} = d_{l+1} * Rz_l                       (identity: Ra_{l+1} = Rz_l)
//   R-backward  Rdelta_{L-1} = H_out Rz_{L-1}                   (the loss head: diag(h) or softmax)
//               (Hv)_{W_l} = Rdelta_l^T a_l + delta_l^T Ra_l     [K, o, i]
//               (Hv)_{b_l} = sum_m Rdelta_l                      [K, o]
//               Re_l = Rdelta_l W_l + delta_l V_l
//               Rdelta_{l-1} = d_l * Re_l + phi''(z_{l-1}) e_l Rz_{l-1}
//                            = d_l * Re_l + d2_l e_l Rz_{l-1}    (the residual term; tanh: d2 = -2 a d)
//
// GGN-vector products (ggn = true) are the same recurrence with every term that involves delta
// dropped: (Gv)_{W_l} = Rdelta_l^T a_l, Re_l = Rdelta_l W_l, Rdelta_{l-1} = d_l * Re_l (the
// linearised network, J^T H_out J v).
//
// Cost for K vectors: the forward and delta pass once, then per layer and vector six products of
// M n_l n_{l+1} multiply-adds (two for the first layer, which has Ra_0 = 0 and no Re_0); the
// elementwise work is one fused pass per R-forward and R-backward step (E::r_scale, E::r_residual,
// which forms d2 e on the fly). Rz_{l-1} is kept only where a curved activation needs it for the
// residual term.
#pragma once
#include "stack.h"

namespace hessext {

// The passes every vector shares: forward, loss head and (for the HVP) the delta pass.
struct SharedPasses {
  Forward f;
  LossHead head;
  Backward g;
};

template <class E>
SharedPasses shared_passes(const Stack& s, bool ggn) {
  Forward f = forward<E>(s);
  LossHead head = loss_head<E>(s, f.a[s.L]);
  Backward g = ggn ? Backward{} : backward(s, f, head);
  return {std::move(f), std::move(head), std::move(g)};
}

// The products for vectors (stack order, each [K, *param shape] or, K = 1, [*param shape]) written
// into out, the same shapes, contiguous; sh holds s's shared passes (s may be a copy of the stack made
// in another thread, over the same rows).
template <class E>
void hvp_into(const Stack& s, const SharedPasses& sh, at::TensorList vectors, const std::vector<at::Tensor>& out,
              bool ggn) {
  const int64_t M = s.M, L = s.L, K = vectors[s.slot_W[0]].numel() / s.W[0].numel();
  const Forward& f = sh.f;
  const Backward& g = sh.g;

  std::vector<at::Tensor> V(L), Vb(L);
  for (int64_t l = 0; l < L; ++l) {
    V[l] = vectors[s.slot_W[l]].contiguous().view({K, s.W[l].size(0), s.W[l].size(1)});
    // contiguous for E::r_scale: a view of a user's flat [K, P] rows reshapes to a strided view
    if (s.slot_b[l] >= 0) Vb[l] = vectors[s.slot_b[l]].reshape({1, -1}).contiguous();
  }

  std::vector<at::Tensor> Ra(L), Rzs(L);  // Ra[l], Rzs[l] (residual layers only): [M, K, n_l], l >= 1
  at::Tensor Rz;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t i = s.width(l), o = s.width(l + 1);
    const at::Tensor vb = s.act_after(l) ? Vb[l] : at::Tensor();  // joins the activation step's pass
    Rz = s.affine(f.a[l], V[l].view({K * o, i}).t(), vb.defined() ? at::Tensor() : Vb[l]);  // [M, K*o]
    if (l > 0) hessext::addmm_(Rz.view({M * K, o}), Ra[l].view({M * K, i}), s.W[l].t());
    if (l == L - 1) break;
    const at::Tensor R = Rz.view({M, K, o});
    if (!ggn && s.curved_after(l)) {
      Rzs[l + 1] = R;
      Ra[l + 1] = s.scratch(R.sizes());
      E::r_scale(Ra[l + 1], R, f.d[l + 1], vb);
    } else {
      if (s.act_after(l)) E::r_scale(R, R, f.d[l + 1], vb);
      Ra[l + 1] = R;
    }
  }

  at::Tensor Rdelta = sh.head.apply(Rz.view({M, K, s.width(L)}));
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t i = s.width(l), o = s.width(l + 1);
    const at::Tensor HW = out[s.slot_W[l]].view({K, o, i});
    hessext::mm_into(HW.view({K * o, i}), Rdelta.view({M, K * o}).t(), f.a[l]);
    if (l > 0 && !ggn) HW.baddbmm_(g.delta[l].t().expand({K, o, M}), Ra[l].transpose(0, 1));
    if (s.slot_b[l] >= 0) {
      at::Tensor Hb = out[s.slot_b[l]].view({K, o});
      at::sum_out(Hb, Rdelta, 0);
    }
    if (l == 0) break;
    const at::Tensor Re = s.scratch({M, K * i});
    if (ggn) {
      hessext::mm_into(Re.view({M * K, i}), Rdelta.view({M * K, o}), s.W[l]);
    } else {
      Re.view({M, K, i}).transpose(0, 1).baddbmm_(g.delta[l].expand({K, M, o}), V[l], 0.0);
      hessext::addmm_(Re.view({M * K, i}), Rdelta.view({M * K, o}), s.W[l]);
    }
    if (Rzs[l].defined()) {
      E::r_residual(Re.view({M, K, i}), f.d[l], f.d2[l], g.e[l], Rzs[l]);
    } else if (f.d[l].defined()) {
      E::r_scale(Re.view({M, K, i}), Re.view({M, K, i}), f.d[l]);
    }
    Rdelta = Re.view({M, K, i});
  }
}

// The products as new tensors [*lead, *param shape], lead {K} or {} (one unbatched vector).
template <class E>
std::vector<at::Tensor> hvp(const Stack& s, at::TensorList vectors, const std::vector<int64_t>& lead, bool ggn) {
  const std::vector<at::Tensor> out = s.new_slots(lead);
  hvp_into<E>(s, shared_passes<E>(s, ggn), vectors, out, ggn);
  return out;
}

}  // namespace hessext
