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
// Its reverse pass (output_jet_backward) differentiates it, for training through input derivatives.
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

// output_jet's multiply-adds per sample, cols = 1 + d + q channels through every layer.
inline int64_t jet_multiply_adds(const Stack& s, int64_t cols) {
  int64_t work = 0;
  for (int64_t l = 0; l < s.L; ++l) work += s.width(l) * s.width(l + 1) * cols;
  return work;
}

// The feature indices as a tensor on the stack's device.
inline at::Tensor feature_index(const Stack& s, const std::vector<int64_t>& features) {
  return at::tensor(features, at::TensorOptions().dtype(at::kLong)).to(s.x.device());
}

// The jet at the network output: [1 + d + q, M, C]. The bias joins the value channel in the activation
// step (or, after the last layer, by itself). features: the input features the channels follow (the
// Laplacian sums over them; default all; d is their number).
// saved (for the reverse pass below): each hidden layer's jet before and after its activation,
// [Z_0, A_1, Z_1, A_2, ..., Z_{L-2}, A_{L-1}], as new tensors (else the jets are the call's scratch).
template <class E>
at::Tensor output_jet(const Stack& s, JetMode mode, const std::vector<int64_t>* features = nullptr,
                      std::vector<at::Tensor>* saved = nullptr) {
  const int64_t M = s.M, d = features ? static_cast<int64_t>(features->size()) : s.width(0);
  const int64_t q = jet_channels(mode, d), cols = 1 + d + q;
  const auto pairs = jet_pairs(mode, d);
  at::Tensor jet;
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t o = s.W[l].size(0), n = s.width(l);
    const at::Tensor z = saved ? hessext::kept_empty({cols, M, o}, s.x.options()) : s.scratch({cols, M, o});
    if (l == 0) {  // the start jet is (x, I, 0): z = x W^T, Jz = W in every sample, Sz = 0, no product over I
      hessext::mm_into(z.select(0, 0), s.x, s.W[0].t());
      const at::Tensor rows = features ? s.W[0].t().index_select(0, feature_index(s, *features))
                                       : s.W[0].t().contiguous();  // rows of W^T, not columns of W
      z.narrow(0, 1, d).copy_(rows.unsqueeze(1).expand({d, M, o}));
      z.narrow(0, 1 + d, q).zero_();
    } else {
      hessext::mm_into(z.view({cols * M, o}), jet.view({cols * M, n}), s.W[l].t());
    }
    if (s.act_after(l)) {
      at::Tensor bias = s.b[l];
      if (saved) {  // the jet before the activation, bias included, is what the reverse pass differentiates at
        if (bias.defined()) z.select(0, 0).add_(bias);
        saved->push_back(hessext::kept_empty({cols, M, o}, s.x.options()).copy_(z));
        bias = at::Tensor();
      }
      E::jet_activation(z, bias, s.act[l], s.p0[l], s.p1[l], d, mode == JetMode::Laplacian, pairs);
      if (saved) saved->push_back(z);
    } else if (s.b[l].defined()) {
      z.select(0, 0).add_(s.b[l]);
    }
    jet = z;
  }
  return jet;
}

// The reverse of the jets: given G [1 + k + q, M, C], the gradient of a loss in the output jet (u, its
// derivatives in the k features, the q second-order channels of `mode`), the gradients in the inputs
// x, each weight and each bias (undefined where the layer has none), from output_jet's saved jets.
// Per layer l, from the top, with G the gradient in the layer's output jet (z, Jz, Sz) and A its input
// jet (a, Ja, Sa), and P the pairs (i, j) of the second-order channels (the Laplacian: one channel,
// the pairs (i, i) summed):
//   Linear     dW = sum over channels G_c^T A_c   (one GEMM over all 1 + k + q channels)
//              db = sum over samples G_value,     dA = G W   (one GEMM)
//   phi        dz  = phi' da + phi'' sum_i dJa_i Jz_i + sum_P dSa_p (phi'' Sz_p + phi''' Jz_i Jz_j)
//              dJz_i = phi' dJa_i + phi'' sum_P dSa_p (Jz_j [p = (i, j)] + Jz_i [p = (j, i)]),
//              dSz_p = phi' dSa_p
//   start      A = (x, e_features, 0): dx = G_value W, and dW[:, feature i] += the sample sum of G_(J_i)
// Cost: twice the forward's products (dW and dA per layer) and one elementwise pass per activation.
// dW sums over all (1 + k + q) M rows: ATen's product, not the row pieces of gemm.cpp (which serve long products
// with short sums; on [50, 4096] x [4096, 50], float64, ATen ran 1.4-1.6x faster).
template <class E>
std::vector<at::Tensor> output_jet_backward(const Stack& s, JetMode mode, const std::vector<int64_t>& features,
                                            const std::vector<at::Tensor>& saved, at::Tensor G) {
  const int64_t M = s.M, k = static_cast<int64_t>(features.size()), cols = 1 + k + jet_channels(mode, k);
  const auto pairs = jet_pairs(mode, k);
  std::vector<at::Tensor> grads(1 + 2 * s.L);  // dx, dW_0..dW_{L-1}, db_0..db_{L-1}
  for (int64_t l = s.L - 1; l >= 0; --l) {
    const int64_t o = s.W[l].size(0), n = s.width(l);
    const at::Tensor Gm = G.view({cols * M, o});
    if (s.b[l].defined()) grads[1 + s.L + l] = G.select(0, 0).sum(0);
    if (l == 0) {
      at::Tensor dW = at::mm(G.select(0, 0).t(), s.x);
      dW.index_add_(1, feature_index(s, features), G.narrow(0, 1, k).sum(1).t());
      grads[1] = dW;
      grads[0] = hessext::mm(G.select(0, 0), s.W[0]);
      break;
    }
    const at::Tensor& Z = saved[2 * (l - 1)];
    const at::Tensor& A = saved[2 * (l - 1) + 1];
    grads[1 + l] = at::mm(Gm.t(), A.view({cols * M, n}));
    at::Tensor dA = s.scratch({cols, M, n});
    hessext::mm_into(dA.view({cols * M, n}), Gm, s.W[l]);
    E::jet_activation_backward(dA, Z, A, s.act[l - 1], s.p0[l - 1], s.p1[l - 1], k, mode == JetMode::Laplacian, pairs);
    G = dA;
  }
  return grads;
}

// The tangent of the Laplacian's jets along K weight directions (forward mode through the recurrence
// above): dW_l [K, o_l, n_l] and db_l [K, o_l] (undefined: no direction in that bias), with saved the
// jets output_jet keeps. Per layer, with (ż, J̇z, Ṡz) the tangents of its output jet and (a, Ja, Sa) its
// input jet (A_0 = (x, e_features, 0), whose tangent is 0):
//   Linear     ż = ȧ W^T + a Ẇ^T + ḃ,   J̇z = J̇a W^T + Ja Ẇ^T,   Ṡz = Ṡa W^T + Sa Ẇ^T
//   phi        ȧ = phi' ż,   J̇a_i = phi'' ż Jz_i + phi' J̇z_i,
//              Ṡa = phi'' ż Sz + phi' Ṡz + phi''' ż sum_i Jz_i^2 + 2 phi'' sum_i Jz_i J̇z_i
// Layout [k + 2, M, K, o]: the K directions inside each sample's row, so that both products of a layer
// are single GEMMs without a transpose, [(k+2) M, n] x [n, K o] and [(k+2) M K, n] x [n, o].
// Returns the output jet's tangent [k + 2, M, K, C] (the hidden layers' tangents in the call's scratch).
template <class E>
at::Tensor output_jet_tangent(const Stack& s, const std::vector<int64_t>& features,
                              const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& dW,
                              const std::vector<at::Tensor>& db) {
  const int64_t M = s.M, k = static_cast<int64_t>(features.size()), cols = k + 2, K = dW[0].size(0);
  at::Tensor adot;
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t o = s.W[l].size(0), n = s.width(l);
    const at::Tensor dWt = dW[l].permute({2, 0, 1}).reshape({n, K * o});  // [n, K o]: Ẇ^T of every direction
    at::Tensor zdot = l == s.L - 1 ? at::empty({cols, M, K, o}, s.x.options()) : s.scratch({cols, M, K, o});
    if (l == 0) {  // a = x: x Ẇ^T; Ja = the unit rows e_i: Ẇ[:, feature i]; Sa = 0
      hessext::mm_into(zdot.select(0, 0).view({M, K * o}), s.x, dWt);
      const at::Tensor columns = dW[0].index_select(2, feature_index(s, features)).permute({2, 0, 1});  // [k, K, o]
      zdot.narrow(0, 1, k).copy_(columns.unsqueeze(1).expand({k, M, K, o}));
      zdot.select(0, 1 + k).zero_();
    } else {
      hessext::mm_into(zdot.view({cols * M, K * o}), saved[2 * l - 1].view({cols * M, n}), dWt);
      hessext::addmm_(zdot.view({cols * M * K, o}), adot.view({cols * M * K, n}), s.W[l].t());
    }
    if (db[l].defined()) zdot.select(0, 0).add_(db[l].unsqueeze(0));
    if (l == s.L - 1) return zdot;
    E::jet_activation_tangent(zdot, saved[2 * l], saved[2 * l + 1], s.act[l], s.p0[l], s.p1[l], k);
    adot = zdot;
  }
  return adot;
}

// The transpose of output_jet_tangent: for K gradients G [k + 2, M, K, C] in the Laplacian's output jet
// (the tangent's layout), each one's gradient in the weights and biases, summed over the samples:
// [dW_0, ..., dW_{L-1} ([K, o_l, n_l]), db_0, ..., db_{L-1} ([K, o_l], undefined where no bias)]. The
// recurrence of output_jet_backward per direction; per layer one GEMM for all K weight gradients,
// [K o, (k+2) M] x [(k+2) M, n], one for the input jet's gradients, [(k+2) M K, o] x [o, n], and one
// elementwise pass (E::jet_activation_backward_batched).
template <class E>
std::vector<at::Tensor> output_jet_vjp(const Stack& s, const std::vector<int64_t>& features,
                                       const std::vector<at::Tensor>& saved, at::Tensor G) {
  const int64_t M = s.M, k = static_cast<int64_t>(features.size()), cols = k + 2, K = G.size(2);
  std::vector<at::Tensor> grads(2 * s.L);
  for (int64_t l = s.L - 1; l >= 0; --l) {
    const int64_t o = s.W[l].size(0), n = s.width(l);
    if (s.b[l].defined()) grads[s.L + l] = G.select(0, 0).sum(0);
    if (l == 0) {                                                          // A_0 = (x, e_features, 0)
      at::Tensor dW = at::matmul(G.select(0, 0).permute({1, 2, 0}), s.x);  // [K, o, M] x [M, n]
      dW.index_add_(2, feature_index(s, features), G.narrow(0, 1, k).sum(1).permute({1, 2, 0}));
      grads[0] = dW;
      break;
    }
    const at::Tensor& Z = saved[2 * (l - 1)];
    const at::Tensor& A = saved[2 * (l - 1) + 1];
    grads[l] = at::mm(G.view({cols * M, K * o}).t(), A.view({cols * M, n})).view({K, o, n});
    at::Tensor dA = s.scratch({cols, M, K, n});
    hessext::mm_into(dA.view({cols * M * K, n}), G.view({cols * M * K, o}), s.W[l]);
    E::jet_activation_backward_batched(dA, Z, A, s.act[l - 1], s.p0[l - 1], s.p1[l - 1], k);
    G = dA;
  }
  return grads;
}

// mode Laplacian: the Laplacian of each output, [M, C]. Diagonal/Full: the input Hessian of the
// loss per sample, [M, d] or [M, d, d]. (New tensors: the jets are the call's scratch.)
template <class E>
at::Tensor input_derivatives(const Stack& s, JetMode mode) {
  const int64_t d = s.width(0);
  const at::Tensor jet = output_jet<E>(s, mode);  // [1 + d + q, M, C]
  if (mode == JetMode::Laplacian) return jet.select(0, 1 + d).clone();
  const LossHead head = loss_head<E>(s, jet.select(0, 0));
  const at::Tensor J = jet.narrow(0, 1, d).permute({1, 0, 2});        // [M, d, C]
  const at::Tensor S = jet.narrow(0, 1 + d, jet.size(0) - 1 - d);     // [q, M, C]
  const at::Tensor curvature = (head.g.unsqueeze(0) * S).sum(2).t();  // [M, q]
  const at::Tensor HJ = head.apply(J);                                // [M, d, C]
  if (mode == JetMode::Diagonal) return (J * HJ).sum(2).add_(curvature);
  at::Tensor H = at::matmul(J, HJ.transpose(1, 2));  // [M, d, d]
  int64_t k = 0;
  for (const auto& ij : jet_pairs(mode, d)) {
    const at::Tensor c = curvature.select(1, k++);
    H.select(1, ij.first).select(1, ij.second).add_(c);
    if (ij.first != ij.second) H.select(1, ij.second).select(1, ij.first).add_(c);
  }
  return H;
}

}  // namespace hessext
