// Second derivatives with respect to the inputs, in one forward-mode pass ("jets"). Indices as in
// stack.h; d input features; per sample and unit the pass carries the value, the first derivatives
// J = da/dx [d] and q second-order channels S, each a (sum of) d^2 a / dx_i dx_j:
//   Laplacian: q = 1, S = sum_i d^2/dx_i^2;  diagonal: q = d, (i, i);  full: q = d(d+1)/2, (i <= j).
//
//   Linear     z = W a + b,  Jz = W Ja,  Sz = W Sa                 (one GEMM over all 1+d+q columns)
//   phi        a = phi(z),   Ja = d Jz,  Sa[(i,j)] = d Sz[(i,j)] + d2 Jz[i] Jz[j]   (d = phi', d2 = phi'')
//   start      a_0 = x, J = I_d, S = 0
//
// The Laplacian of the model output is S at the output. The input Hessian of the loss is
// sum_{c,c'} Jz[c,i] H_out[c,c'] Jz[c',j] + sum_c g_c Sz[c,(i,j)] (g, H_out: the loss head).
// Cost: M * sum_l n_l n_{l+1} (1 + d + q) multiply-adds, a few forward passes for small d.
// Layout: channel, then sample, then unit: [1 + d + q, M, n], so each Linear is one GEMM
// [(1+d+q) M, n] @ W^T, whose long side is its rows (the shape the CPU products run fastest in, row
// pieces on OpenBLAS's small-matrix path: gemm.cpp), and each channel is one contiguous [M, n] block
// that the activation step runs along with the same [M, n] derivatives (vectorised on the CPU,
// coalesced on the GPU).
#pragma once
#include "stack.h"

namespace hessext {

enum class JetMode : int64_t { Laplacian = 0, Diagonal = 1, Full = 2 };

inline int64_t jet_channels(JetMode mode, int64_t d) {
  return mode == JetMode::Laplacian ? 1 : (mode == JetMode::Diagonal ? d : d * (d + 1) / 2);
}

// The (i, j) pair of each second-order channel (Laplacian: a single summed channel, pairs unused).
inline std::vector<std::pair<int64_t, int64_t>> jet_pairs(JetMode mode, int64_t d) {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = (mode == JetMode::Full ? i : 0); j < d; ++j)
      if (mode == JetMode::Full || (mode == JetMode::Diagonal && i == j)) pairs.emplace_back(i, j);
  return pairs;
}

// The jet at the network output: [1 + d + q, M, C]. The bias joins the value channel in the activation
// step (or, after the last layer, by itself).
template <class E>
at::Tensor output_jet(const Stack& s, JetMode mode) {
  const int64_t M = s.M, d = s.width(0), q = jet_channels(mode, d), cols = 1 + d + q;
  const auto pairs = jet_pairs(mode, d);
  at::Tensor jet;
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t o = s.W[l].size(0), n = s.width(l);
    const at::Tensor z = s.scratch({cols, M, o});
    if (l == 0) {  // the start jet is (x, I, 0): z = x W^T, Jz = W in every sample, Sz = 0, no product over I
      hx::mm_into(z.select(0, 0), s.x, s.W[0].t());
      z.narrow(0, 1, d).copy_(s.W[0].t().contiguous().unsqueeze(1).expand({d, M, o}));  // rows of W^T, not columns of W
      z.narrow(0, 1 + d, q).zero_();
    } else {
      hx::mm_into(z.view({cols * M, o}), jet.view({cols * M, n}), s.W[l].t());
    }
    if (s.act_after(l)) {
      E::jet_activation(z, s.b[l], s.act[l], s.p0[l], s.p1[l], d, mode == JetMode::Laplacian, pairs);
    } else if (s.b[l].defined()) {
      z.select(0, 0).add_(s.b[l]);
    }
    jet = z;
  }
  return jet;
}

// mode Laplacian: the Laplacian of each output, [M, C]. Diagonal/Full: the input Hessian of the
// loss per sample, [M, d] or [M, d, d]. (New tensors: the jets are the call's scratch.)
template <class E>
at::Tensor input_derivatives(const Stack& s, JetMode mode) {
  const int64_t d = s.width(0);
  const at::Tensor jet = output_jet<E>(s, mode);  // [1 + d + q, M, C]
  if (mode == JetMode::Laplacian) return jet.select(0, 1 + d).clone();
  const LossHead head = loss_head<E>(s, jet.select(0, 0));
  const at::Tensor J = jet.narrow(0, 1, d).permute({1, 0, 2});              // [M, d, C]
  const at::Tensor S = jet.narrow(0, 1 + d, jet.size(0) - 1 - d);           // [q, M, C]
  const at::Tensor curvature = (head.g.unsqueeze(0) * S).sum(2).t();       // [M, q]
  const at::Tensor HJ = head.apply(J);                                      // [M, d, C]
  if (mode == JetMode::Diagonal) return (J * HJ).sum(2).add_(curvature);
  at::Tensor H = at::matmul(J, HJ.transpose(1, 2));                         // [M, d, d]
  int64_t k = 0;
  for (const auto& ij : jet_pairs(mode, d)) {
    const at::Tensor c = curvature.select(1, k++);
    H.select(1, ij.first).select(1, ij.second).add_(c);
    if (ij.first != ij.second) H.select(1, ij.second).select(1, ij.first).add_(c);
  }
  return H;
}

}  // namespace hessext
