// Batched Hessian-vector products of a loss through a Linear/activation stack, by Pearlmutter's
// R-operator, R(.) = d/dr (.)(theta + r v) at r = 0, for K vectors v = (V_l, vb_l) at once.
// Indices as in stack.h; R-quantities carry the vector index k in the middle: [M, K, width], so
// that each product below is one GEMM over all K vectors.
//
//   R-forward   Rz_l = Ra_l W_l^T + a_l V_l^T + vb_l           (Ra_0 = 0)
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
// Cost for K vectors: the forward and delta pass once, then per layer at most four GEMMs of
// M x (K n_l) x n_{l+1} (two for the first layer); the elementwise work is one fused pass per
// R-forward and R-backward step (E::r_scale, E::r_residual, which forms d2 e on the fly). Rz_{l-1}
// is kept only where a curved activation needs it for the residual term.
#pragma once
#include "stack.h"

namespace hessext {

// vectors (checked by Stack::check_vectors) and the results: [*lead, *param shape], lead {K} or {} (K = 1).
template <class E>
std::vector<at::Tensor> hvp(const Stack& s, at::TensorList vectors, const std::vector<int64_t>& lead, bool ggn) {
  const int64_t K = num_vectors(lead), M = s.M, L = s.L;
  const auto shapes = s.slot_shapes(lead);
  const Forward f = forward<E>(s);
  const LossHead head = loss_head<E>(s, f.a[L]);
  const Backward g = ggn ? Backward{} : backward(s, f, head);

  std::vector<at::Tensor> V(L), Vb(L);
  for (int64_t l = 0; l < L; ++l) {
    V[l] = vectors[s.slot_W[l]].contiguous().view({K, s.W[l].size(0), s.W[l].size(1)});
    if (s.slot_b[l] >= 0) Vb[l] = vectors[s.slot_b[l]].reshape({1, -1});
  }

  std::vector<at::Tensor> Ra(L), Rzs(L);  // Ra[l], Rzs[l] (residual layers only): [M, K, n_l], l >= 1
  at::Tensor Rz;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t i = s.width(l), o = s.width(l + 1);
    Rz = s.affine(f.a[l], V[l].view({K * o, i}).t(), Vb[l]);  // [M, K*o]
    if (l > 0) hx::addmm_(Rz.view({M * K, o}), Ra[l].view({M * K, i}), s.W[l].t());
    if (l == L - 1) break;
    const at::Tensor R = Rz.view({M, K, o});
    if (!ggn && s.curved_after(l)) {
      Rzs[l + 1] = R;
      Ra[l + 1] = s.scratch(R.sizes());
      at::mul_out(Ra[l + 1], R, f.d[l + 1].unsqueeze(1));
    } else {
      if (s.act_after(l)) E::r_scale(R, f.d[l + 1]);
      Ra[l + 1] = R;
    }
  }

  std::vector<at::Tensor> out(s.num_slots);
  at::Tensor Rdelta = head.apply(Rz.view({M, K, s.width(L)}));
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t i = s.width(l), o = s.width(l + 1);
    at::Tensor HW = hx::mm(Rdelta.view({M, K * o}).t(), f.a[l]).view({K, o, i});
    if (l > 0 && !ggn) {  // + delta_l^T Ra_l per vector: for one, straight into HW
      if (K == 1) hx::addmm_(HW.view({o, i}), g.delta[l].t(), Ra[l].view({M, i}));
      else HW.add_(hx::mm(Ra[l].view({M, K * i}).t(), g.delta[l]).view({K, i, o}).transpose(1, 2));
    }
    out[s.slot_W[l]] = HW.view(shapes[s.slot_W[l]]);
    if (s.slot_b[l] >= 0) out[s.slot_b[l]] = Rdelta.sum(0).view(shapes[s.slot_b[l]]);
    if (l == 0) break;
    const at::Tensor Re = s.scratch({M, K * i});
    if (ggn) {
      hx::mm_into(Re.view({M * K, i}), Rdelta.view({M * K, o}), s.W[l]);
    } else {
      hx::mm_into(Re, g.delta[l], V[l].permute({1, 0, 2}).reshape({o, K * i}));
      hx::addmm_(Re.view({M * K, i}), Rdelta.view({M * K, o}), s.W[l]);
    }
    if (Rzs[l].defined()) {
      E::r_residual(Re.view({M, K, i}), f.d[l], f.d2[l], g.e[l], Rzs[l]);
    } else if (f.d[l].defined()) {
      E::r_scale(Re.view({M, K, i}), f.d[l]);
    }
    Rdelta = Re.view({M, K, i});
  }
  return out;
}

}  // namespace hessext
