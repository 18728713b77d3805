// Exact diagonals of the Hessian (or of the GGN) of a loss through a Linear/activation stack, by
// back-propagating each sample's pre-activation Hessian G_l = d^2 loss_m / dz_l^2 in factored form.
// Indices as in stack.h; per sample m:
//
//   G_{L-1} = H_out                                      (the loss head: diag(h) or softmax)
//   G_{l-1} = D_l W_l^T G_l W_l D_l + diag(R_{l-1}),   D_l = diag(d_l),
//   R_{l-1} = phi''(z_{l-1}) e_l = d2_l e_l              (the residual term; 0 for the GGN)
//   diag(H)_{W_l}[o, i] = sum_m G_l[m, o, o] a_l[m, i]^2,  diag(H)_{b_l}[o] = sum_m G_l[m, o, o]
//
// G_l is kept as F sigma F^T + diag(R_l): F [n_{l+1}, M, Q] dense signed factor columns (sigma = +-1
// per sample and column, in blocks), R_l the pending diagonal. One step down:
//   dense part   F <- d_l * (W_l^T F)                            one GEMM n_l x n_{l+1} x (M Q)
//   diag(G_{l-1}) = sum_q sigma F^2 + d_l^2 (R_l @ W_l^.2) + R_{l-1}  (W^.2 elementwise square;
//                                                                    one GEMM M x n_{l+1} x n_l)
//   R_l turns into factor columns d_l[m,i] W_l[o,i] sqrt|R_l[m,o]| with signs sign(R_l) only when G
//   must travel further down (l-1 > 0); they are built elementwise, never by a GEMM.
// A diagonal H_out starts as the pending diagonal R_{L-1} = h (no dense factor); the softmax one as
// the C factor columns of its square root sqrt(w) (diag(s) - p s^T), s = sqrt(p).
// Cost: per layer one GEMM of n_l x n_{l+1} x M Q_l, Q_l = (C for softmax) + the widths of the
// curved layers above l that feed a further step; plus O(M n_l n_{l+1}) elementwise and small GEMMs.
#pragma once
#include <cmath>

#include "stack.h"

namespace hessext {

// G_l's dense factor is kept as blocks (no concatenation): the C-block from the loss (all signs +1)
// and one block per residual term that had to travel (signs sign(R)).
struct FactorBlock {
  at::Tensor F;      // [n_{l+1}, M, Q_b]
  at::Tensor sigma;  // [M, Q_b] or undefined (all +1)
};

// sum_m A[m, o] B[m, i] -> [o, i]. float32 sums over many samples run in chunks of rows accumulated in
// float64, so that the diagonal of a large batch is as accurate as the HVP's.
inline at::Tensor sum_over_samples(const at::Tensor& A, const at::Tensor& B) {
  constexpr int64_t kRows = 4096;
  if (A.scalar_type() != at::kFloat || A.size(0) <= kRows) return hessext::mm(A.t(), B);
  at::Tensor acc = at::zeros({A.size(1), B.size(1)}, A.options().dtype(at::kDouble));
  for (int64_t m0 = 0; m0 < A.size(0); m0 += kRows) {
    const int64_t mc = std::min(kRows, A.size(0) - m0);
    acc.add_(hessext::mm(A.narrow(0, m0, mc).t(), B.narrow(0, m0, mc)));
  }
  return acc.to(at::kFloat);
}

template <class E>
std::vector<at::Tensor> diag(const Stack& s, bool ggn, bool per_sample) {
  const int64_t M = s.M, L = s.L;
  const Forward f = forward<E>(s);
  const LossHead head = loss_head<E>(s, f.a[L]);
  const Backward g = ggn ? Backward{} : backward(s, f, head);
  const auto opts = s.x.options();

  std::vector<FactorBlock> blocks;
  at::Tensor R;   // pending diagonal [M, n_{l+1}] or undefined
  at::Tensor dG;  // diag(G_l): [M, n_{l+1}]
  if (head.softmax()) {
    blocks.push_back({head.factor(), {}});
    dG = (head.h - head.h.square()).mul_(head.w.unsqueeze(1));
  } else {
    R = head.h;
    dG = head.h;
  }

  std::vector<at::Tensor> out(s.num_slots);
  for (int64_t l = L - 1; l >= 0; --l) {
    const at::Tensor a2 = f.a[l].square();  // [M, n_l]
    out[s.slot_W[l]] = per_sample ? dG.unsqueeze(2) * a2.unsqueeze(1) : sum_over_samples(dG, a2);
    if (s.slot_b[l] >= 0) out[s.slot_b[l]] = per_sample ? dG : dG.sum(0);
    if (l == 0) break;

    const int64_t i = s.width(l), o = s.width(l + 1);
    const at::Tensor& d = f.d[l];  // [M, i] or undefined (identity)
    at::Tensor dGn = R.defined() ? hessext::mm(R, s.W[l].square()) : at::zeros({M, i}, opts);
    if (R.defined() && d.defined()) dGn.mul_(d.square());
    for (auto& b : blocks) {  // F <- d * (W^T F), dG += sum_q sigma F^2, one GEMM and one fused pass
      const int64_t Q = b.F.size(2);
      b.F = hessext::mm(s.W[l].t(), b.F.reshape({o, M * Q})).view({i, M, Q});
      E::scale_square_sum(b.F, d, b.sigma, dGn);
    }
    if (R.defined() && l - 1 > 0)  // G_{l-1} travels further: R_l becomes a block of factor columns
      blocks.push_back({E::residual_factor(s.W[l], R, d), R.sign()});
    R = ggn ? at::Tensor() : residual(s, f, g, l);
    if (R.defined()) dGn.add_(R);
    dG = dGn;
  }
  return out;
}

}  // namespace hessext
