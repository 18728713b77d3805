// Dense Hessians of a loss through a Linear/activation stack, from the structure of the stack rather
// than from P Hessian-vector products. Indices as in stack.h; for a layer with a bias its input is
// augmented, abar_l = [a_l, 1], so that W_l and b_l form one block [o, ibar].
//
// Per sample m, with G_l = d^2 loss_m / dz_l^2 (the pre-activation Hessian of diag.h, held whole),
// A_{l,k} = da_l/dz_k (k < l: A_{l,l-1} = D_l, A_{l,k-1} = A_{l,k} W_k D_k) and J_{l,k} = W_l A_{l,k}:
//
//   H_{ll}[(o,i),(p,j)] = sum_m G_l[o,p] abar_l[i] abar_l[j]                          (Kronecker term)
//   H_{lk}[(o,i),(p,j)] = sum_m abar_k[j] ( (G_l J_{l,k})[o,p] abar_l[i]             (k < l: GGN-like
//                                         + delta_l[o] Abar_{l,k}[i,p] )              + bilinear cross term)
//
// (Abar's bias row is zero.) With B = G_l (k = l) or G_l J_{l,k}, each block is two GEMMs over the
// samples, in the block's layout [(o,p), (ibar,jbar)]:
//   Kronecker/GGN term  B^T [(o,p), m] x (abar_l abar_k^T) [m, (ibar,jbar)]
//   cross term          delta^T [o, m] x (A abar_k^T) [m, (i,p,jbar)], or, where o < jbar,
//                       (delta A) [m, (o,i,p)]^T x abar_k [m, jbar]  (the smaller per-sample factor)
// accumulated per block pair over chunks of samples and scattered into H once; the blocks with k > l
// are the mirrored transposes, so the result is exactly symmetric. A diagonal block (k = l) is
// symmetric under (o,i) <-> (p,j), and G_l and abar abar^T are symmetric, so its GEMM forms only the
// rows of the lower pairs p <= o (half the multiply-adds and accumulator); put_diagonal_block writes
// them into H's lower triangle, the rest by mirroring. Every GEMM
// sums over a whole chunk of samples (all of them, unless memory says otherwise), and its per-sample
// factors are the size of a row of the block, not of the block. The accumulators come from the call's workspace (kept
// between calls, so their pages are not faulted in again) and are written once, never zero-filled, as is H.
// Cost: M * sum_{k<l}
// P_l P_k + M * sum_l P_l^2 / 2 multiply-adds plus O(M n^3) for the G_l and A_{l,k}. Memory: H plus
// the block accumulators (under P^2) and one chunk's factors.
#pragma once
#include "jets.h"
#include "stack.h"

namespace hessext {

// Elements of the per-chunk work tensors (T of the block GEMMs, the G_l of a chunk of samples).
constexpr int64_t kHessianChunkElems = int64_t(1) << 24;
constexpr int64_t kWidenedChunk = 256;

// G_l for samples [m0, m1): G[l]: [mc, n_{l+1}, n_{l+1}], from G_{L-1} = H_out (the loss head) by
// G_{l-1} = D_l W_l^T G_l W_l D_l + diag(R_{l-1}), R_{l-1} = d2_l e_l (curved activations).
inline std::vector<at::Tensor> pre_activation_hessians(const Stack& s, const Forward& f, const Backward& g,
                                                       const LossHead& head, int64_t m0, int64_t m1) {
  const int64_t L = s.L, mc = m1 - m0;
  std::vector<at::Tensor> G(L);
  G[L - 1] = head.dense(m0, mc);
  for (int64_t l = L - 1; l >= 1; --l) {
    at::Tensor next = at::matmul(s.W[l].t(), at::matmul(G[l], s.W[l]));  // [mc, i, i]
    if (f.d[l].defined()) {
      const at::Tensor dc = f.d[l].narrow(0, m0, mc);
      next.mul_(dc.unsqueeze(2) * dc.unsqueeze(1));
    }
    if (f.d2[l].defined()) next.diagonal(0, 1, 2).add_(f.d2[l].narrow(0, m0, mc) * g.e[l].narrow(0, m0, mc));
    G[l - 1] = next;
  }
  return G;
}

// Writes a block [o, ibar, p, jbar] (rows: layer l, columns: layer k) into H at the parameter offsets
// (a bias row or column only where the layer has a bias). The blocks k <= l cover H's lower part once.
inline void put_block(at::Tensor& H, const at::Tensor& block, const Stack& s, int64_t l, int64_t k, int64_t rw,
                      int64_t rb, int64_t cw, int64_t cb) {
  const int64_t o = s.W[l].size(0), i = s.W[l].size(1), p = s.W[k].size(0), j = s.W[k].size(1);
  auto sub = [&](int64_t r0, int64_t nr0, int64_t nr1, int64_t c0, int64_t nc0, int64_t nc1) {
    return H.narrow(0, r0, nr0 * nr1).narrow(1, c0, nc0 * nc1).view({nr0, nr1, nc0, nc1});
  };
  sub(rw, o, i, cw, p, j).copy_(block.narrow(1, 0, i).narrow(3, 0, j));
  if (cb >= 0) sub(rw, o, i, cb, p, 1).copy_(block.narrow(1, 0, i).narrow(3, j, 1));
  if (rb >= 0) sub(rb, o, 1, cw, p, j).copy_(block.narrow(1, i, 1).narrow(3, 0, j));
  if (rb >= 0 && cb >= 0) sub(rb, o, 1, cb, p, 1).copy_(block.narrow(1, i, 1).narrow(3, j, 1));
}

// Row of pair (o, p), p <= o, among a diagonal block's lower pairs (packed row by row).
inline int64_t lower_pair(int64_t o, int64_t p) { return o * (o + 1) / 2 + p; }

// The flat positions o * n + p of the lower pairs (p <= o) of an [n, n] matrix, in lower_pair order.
inline at::Tensor lower_index(int64_t n, const at::Device& device) {
  std::vector<int64_t> idx;
  for (int64_t o = 0; o < n; ++o)
    for (int64_t p = 0; p <= o; ++p) idx.push_back(o * n + p);
  return at::tensor(idx, at::TensorOptions().dtype(at::kLong)).to(device);
}

// A diagonal block of layer l from its lower pairs, half [o (o + 1) / 2, ibar, ibar] (H's dtype), into
// H's lower triangle at the layer's offsets (symmetrize_from_lower fills the rest): the W rows of unit
// o against the W columns of the units p <= o; the bias row of o against every W column (for p > o
// the mirrored pair (p, o), transposed) and against the biases p <= o.
inline void put_diagonal_block(at::Tensor& H, const at::Tensor& half, const Stack& s, int64_t l, int64_t rw,
                               int64_t rb) {
  const int64_t O = s.W[l].size(0), n = s.W[l].size(1);
  const at::Tensor Hww = H.narrow(0, rw, O * n).narrow(1, rw, O * n).view({O, n, O, n});
  std::vector<int64_t> mirrored;
  for (int64_t o = 0; o < O; ++o) {
    const at::Tensor pairs = half.narrow(0, lower_pair(o, 0), o + 1);  // (o, 0..o): [o + 1, ibar, ibar]
    Hww.select(0, o).narrow(1, 0, o + 1).copy_(pairs.narrow(1, 0, n).narrow(2, 0, n).permute({1, 0, 2}));
    if (rb < 0) continue;
    const at::Tensor bias_row = H.select(0, rb + o);
    bias_row.narrow(0, rw, (o + 1) * n).view({o + 1, n}).copy_(pairs.select(1, n).narrow(1, 0, n));
    bias_row.narrow(0, rb, o + 1).copy_(pairs.select(1, n).select(1, n));
    if (o + 1 == O) continue;
    mirrored.clear();
    for (int64_t p = o + 1; p < O; ++p) mirrored.push_back(lower_pair(p, o));
    const at::Tensor idx = at::tensor(mirrored, at::TensorOptions().dtype(at::kLong)).to(half.device());
    bias_row.narrow(0, rw + (o + 1) * n, (O - o - 1) * n)
        .view({O - o - 1, n})
        .copy_(half.index_select(0, idx).select(2, n).narrow(1, 0, n));
  }
}

// Mirrors a square block's lower triangle onto its upper one in place, tile by tile (no temporary of
// the block's size): exactly symmetric, one pass.
inline void symmetrize_square_(at::Tensor S) {
  constexpr int64_t kTile = 256;
  const int64_t n = S.size(0);
  for (int64_t r = 0; r < n; r += kTile)
    for (int64_t c = r; c < n; c += kTile) {
      const int64_t nr = std::min(kTile, n - r), nc = std::min(kTile, n - c);
      at::Tensor upper = S.narrow(0, r, nr).narrow(1, c, nc);
      if (c > r) {
        upper.copy_(S.narrow(0, c, nc).narrow(1, r, nr).t());
      } else {  // a tile on the diagonal: tril(t) + tril(t, -1)^T
        const at::Tensor strict = upper.tril(-1).t();
        upper.tril_().add_(strict);
      }
    }
}

// Exact symmetry for a Hessian whose blocks k <= l are filled (stack order): each diagonal block's
// lower triangle is mirrored, each block above the diagonal is the transpose of the one below.
inline void symmetrize_from_lower(at::Tensor& H, const Stack& s) {
  int64_t r0 = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t Pl = s.W[l].numel() + (s.b[l].defined() ? s.W[l].size(0) : 0);
    symmetrize_square_(H.narrow(0, r0, Pl).narrow(1, r0, Pl));
    if (r0 > 0) H.narrow(0, 0, r0).narrow(1, r0, Pl).copy_(H.narrow(0, r0, Pl).narrow(1, 0, r0).t());
    r0 += Pl;
  }
}

// Elements per sample of the chunk factors of block pair (l, k) (module comment): the Kronecker/GGN
// factors, and for k < l the smaller of the two cross-term factors.
inline int64_t pair_factor_elems(const Stack& s, int64_t l, int64_t k) {
  const int64_t o = s.W[l].size(0), n = s.W[l].size(1), p = s.W[k].size(0), ib = n + 1, jb = s.W[k].size(1) + 1;
  return o * p + ib * jb + (k < l ? n * p * std::min(o, jb) : 0);
}

// The dense Hessian in stack order: one [P, P] matrix, or (layer_only) one [P_l, P_l] per layer.
// Memory: the block accumulators and one chunk's factors while the samples are summed (float32
// blocks accumulate in float64, so that a large batch costs no accuracy), then H while the
// accumulators are scattered into it and freed one by one; no temporary of H's size.
// hessext.hessians estimates this peak before the call.
template <class E>
std::vector<at::Tensor> hessian(const Stack& s, bool layer_only, int64_t chunk_elems) {
  const int64_t M = s.M, L = s.L;
  const Forward f = forward<E>(s);
  const LossHead head = loss_head<E>(s, f.a[L]);
  const Backward g = backward(s, f, head);
  const SlotLayout off(s, layer_only);
  const bool widen = s.x.scalar_type() == at::kFloat;
  const auto acc_opts = s.x.options().dtype(widen ? at::kDouble : s.x.scalar_type());
  int64_t widest = 1;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t k = 0; k <= l; ++k)
      if (k == l || !layer_only) widest = std::max(widest, pair_factor_elems(s, l, k));
  // float32: short sums per chunk (kWidenedChunk samples), the chunks summed in float64
  const int64_t mc_max =
      std::max<int64_t>(1, std::min<int64_t>(widen ? kWidenedChunk : M, std::min<int64_t>(M, chunk_elems / widest)));

  // One accumulator per wanted block pair (k <= l), [(o, p), (ibar, jbar)].
  std::vector<at::Tensor> acc;
  auto pair = [](int64_t l, int64_t k) { return l * (l + 1) / 2 + k; };
  for (int64_t l = 0; l < L; ++l)
    for (int64_t k = 0; k <= l; ++k) {
      const bool wanted = k == l || !layer_only;
      const int64_t o = s.W[l].size(0), p = s.W[k].size(0), ib = s.W[l].size(1) + 1, jb = s.W[k].size(1) + 1;
      const int64_t rows = k == l ? o * (o + 1) / 2 : o * p;  // a diagonal block: its lower pairs
      acc.push_back(wanted ? s.ws.empty({rows, ib * jb}, acc_opts) : at::Tensor());
    }
  auto accumulate = [&](const at::Tensor& into, const at::Tensor& A, const at::Tensor& B, bool first) {
    if (widen) {  // into (+)= A B
      first ? into.copy_(hessext::mm(A, B)) : into.add_(hessext::mm(A, B));
    } else {
      first ? hessext::mm_into(into, A, B) : hessext::addmm_(into, A, B);
    }
  };
  // The cross terms' per-sample factor and its product, allocated once for all chunks (a fresh block of
  // 100 MB or more per chunk and pair would be faulted in and zeroed every time: [2,50,50,50,1],
  // N = 1024, 2.8 GB per call) and released before H is.
  int64_t factor_max = 0, product_max = 0;
  for (int64_t l = 0; l < L && !layer_only; ++l)
    for (int64_t k = 0; k < l; ++k) {
      const int64_t o = s.W[l].size(0), n = s.W[l].size(1), p = s.W[k].size(0), jb = s.W[k].size(1) + 1;
      factor_max = std::max(factor_max, n * p * std::min(o, jb));
      product_max = std::max(product_max, o * n * p * jb);
    }
  at::Tensor factor_buf = hessext::empty_output({mc_max * factor_max}, s.x.options());
  at::Tensor product_buf = hessext::empty_output({product_max}, s.x.options());
  std::vector<at::Tensor> lower(L);  // per layer, the lower pairs' positions in G_l (once for all chunks)
  for (int64_t l = 0; l < L; ++l) lower[l] = lower_index(s.W[l].size(0), s.x.device());
  for (int64_t m0 = 0; m0 < M; m0 += mc_max) {
    const int64_t mc = std::min(mc_max, M - m0);
    const std::vector<at::Tensor> G = pre_activation_hessians(s, f, g, head, m0, mc + m0);
    std::vector<at::Tensor> abar(L);
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor a = f.a[l].narrow(0, m0, mc);
      abar[l] = at::cat({a, at::ones({mc, 1}, a.options())}, 1);  // [mc, n_l + 1]
    }
    for (int64_t l = 0; l < L; ++l) {
      const int64_t o = s.W[l].size(0), n = s.W[l].size(1), ib = n + 1;
      const at::Tensor G_lower = G[l].view({mc, o * o}).index_select(1, lower[l]);           // [mc, pairs]
      const at::Tensor GW = l > 0 && !layer_only ? at::matmul(G[l], s.W[l]) : at::Tensor();  // [mc, o, n_l]
      at::Tensor A;  // A_{l,k}: [mc, n_l, n_{k+1}]
      for (int64_t k = l; k >= 0; --k) {
        if (k < l && layer_only) break;
        const int64_t p = s.W[k].size(0), jb = abar[k].size(1);
        if (k == l - 1) {
          A = f.d[l].defined() ? at::diag_embed(f.d[l].narrow(0, m0, mc))
                               : at::eye(n, s.x.options()).expand({mc, n, n});
        } else if (k < l - 1) {  // A_{l,k} = A_{l,k+1} W_{k+1} D_{k+1}
          A = at::matmul(A, s.W[k + 1]);
          if (f.d[k + 1].defined()) A.mul_(f.d[k + 1].narrow(0, m0, mc).unsqueeze(1));
        }
        const at::Tensor B = k == l ? G_lower : at::matmul(GW, A).view({mc, o * p});  // [mc, rows of the block]
        const at::Tensor kron = abar[l].unsqueeze(2) * abar[k].unsqueeze(1);          // [mc, ib, jb]
        const at::Tensor& block = acc[pair(l, k)];
        accumulate(block, B.t(), kron.view({mc, ib * jb}), m0 == 0);
        if (k == l) continue;
        // + sum_m delta[m, o] A[m, i, p] abar_k[m, j], i < n: into the block as [o, n, p, jb]
        const at::Tensor delta = g.delta[l].narrow(0, m0, mc);
        const at::Tensor cross = block.view({o, p, ib, jb}).permute({0, 2, 1, 3}).narrow(1, 0, n);
        const at::Tensor product = product_buf.narrow(0, 0, o * n * p * jb);
        if (o < jb) {
          at::Tensor X = factor_buf.narrow(0, 0, mc * o * n * p).view({mc, o, n, p});
          at::mul_out(X, delta.view({mc, o, 1, 1}), A.unsqueeze(1));
          hessext::mm_into(product.view({o * n * p, jb}), X.view({mc, o * n * p}).t(), abar[k]);
        } else {
          at::Tensor Y = factor_buf.narrow(0, 0, mc * n * p * jb).view({mc, n, p, jb});
          at::mul_out(Y, A.unsqueeze(3), abar[k].view({mc, 1, 1, jb}));
          hessext::mm_into(product.view({o, n * p * jb}), delta.t(), Y.view({mc, n * p * jb}));
        }
        cross.add_(product.view({o, n, p, jb}).to(cross.scalar_type()));
      }
    }
  }
  factor_buf = product_buf = at::Tensor();
  std::vector<at::Tensor> H;
  if (layer_only) {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t Pl = s.W[l].numel() + (s.b[l].defined() ? s.W[l].size(0) : 0);
      H.push_back(hessext::empty_output({Pl, Pl}, s.x.options()));
    }
  } else {
    H.push_back(hessext::empty_output({off.total, off.total}, s.x.options()));
  }
  for (int64_t l = 0; l < L; ++l)
    for (int64_t k = 0; k <= l; ++k) {
      if (!acc[pair(l, k)].defined()) continue;
      const int64_t o = s.W[l].size(0), ib = s.W[l].size(1) + 1, p = s.W[k].size(0), jb = s.W[k].size(1) + 1;
      // in H's dtype (one float32 copy of a float64 block: adding it uncast would compute in float64
      // through block-sized temporaries)
      const at::Tensor block = acc[pair(l, k)].to(s.x.scalar_type());
      at::Tensor& into = H[layer_only ? l : 0];
      if (k == l) {
        put_diagonal_block(into, block.view({o * (o + 1) / 2, ib, ib}), s, l, off.woff[l], off.boff[l]);
      } else {  // [o, ibar, p, jbar]
        put_block(into, block.view({o, p, ib, jb}).permute({0, 2, 1, 3}), s, l, k, off.woff[l], off.boff[l],
                  off.woff[k], off.boff[k]);
      }
      acc[pair(l, k)] = at::Tensor();
    }
  if (layer_only) {  // exact symmetry
    for (auto& Hl : H) symmetrize_square_(Hl);
    return H;
  }
  symmetrize_from_lower(H[0], s);
  return H;
}

// The input Hessian of the loss per sample, W_0^T G_0 W_0 ([M, d, d], or its diagonal [M, d]), by the
// backward recurrence: for wide inputs, where the jets of jets.h would carry too many channels.
template <class E>
at::Tensor input_hessian_backward(const Stack& s, bool diagonal, int64_t chunk_elems) {
  const int64_t M = s.M, d = s.width(0);
  const Forward f = forward<E>(s);
  const LossHead head = loss_head<E>(s, f.a[s.L]);
  const Backward g = backward(s, f, head);
  int64_t widest = d * d;
  for (int64_t l = 0; l <= s.L; ++l) widest = std::max(widest, s.width(l) * s.width(l));
  const int64_t mc_max = std::max<int64_t>(1, std::min<int64_t>(M, chunk_elems / widest));
  at::Tensor out =
      diagonal ? hessext::empty_output({M, d}, s.x.options()) : hessext::empty_output({M, d, d}, s.x.options());
  for (int64_t m0 = 0; m0 < M; m0 += mc_max) {
    const int64_t mc = std::min(mc_max, M - m0);
    const at::Tensor G0 = pre_activation_hessians(s, f, g, head, m0, m0 + mc)[0];
    if (diagonal) {  // diag(W^T G W)[i] = sum_o W[o, i] (G W)[o, i]
      out.narrow(0, m0, mc).copy_((at::matmul(G0, s.W[0]) * s.W[0]).sum(1));
    } else {
      out.narrow(0, m0, mc).copy_(at::matmul(s.W[0].t(), at::matmul(G0, s.W[0])));
    }
  }
  return out;
}

// Laplacians (mode 0) and input Hessians (1: diagonal, 2: full) by whichever method costs less per
// sample: the jets of jets.h, sum_l n_l n_{l+1} (1+d+q) multiply-adds, or the backward recurrence,
// sum n^3 + n_1^2 d (Laplacians: always the jets, q = 1).
struct InputDerivativesPlan {
  JetMode mode;
  bool backward;       // input_hessian_backward rather than the jets
  int64_t per_sample;  // the chosen method's multiply-adds per sample
};

inline InputDerivativesPlan input_derivatives_plan(const Stack& s, int64_t mode) {
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0 (Laplacian), 1 (diagonal) or 2 (full), got ", mode);
  const JetMode jm = static_cast<JetMode>(mode);
  const int64_t d = s.width(0), q = jet_channels(jm, d);
  const int64_t jets = jet_multiply_adds(s, 1 + d + q);
  int64_t back = s.width(1) * s.width(1) * d;
  for (int64_t l = 1; l < s.L; ++l) back += 2 * s.width(l) * s.width(l + 1) * s.width(l + 1);
  const bool use_back = jm != JetMode::Laplacian && back < jets;
  return {jm, use_back, use_back ? back : jets};
}

template <class E>
at::Tensor input_derivatives_any(const Stack& s, const InputDerivativesPlan& plan, int64_t chunk_elems) {
  if (plan.backward) return input_hessian_backward<E>(s, plan.mode == JetMode::Diagonal, chunk_elems);
  return input_derivatives<E>(s, plan.mode);
}

}  // namespace hessext
