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
// (Abar's bias row is zero.) Each block is one GEMM over the samples, T^T abar_k with
// T[m, (o,i,p)] built per chunk of samples (in one reused workspace) and accumulated per block pair
// across the chunks; the blocks with k > l are the mirrored transposes, so the result is exactly
// symmetric. Cost: M * sum_{k<=l} P_l P_k multiply-adds, about half of M P^2, plus O(M n^3) for the
// G_l and A_{l,k}. Memory: H plus the block accumulators (about 1.5 P^2) and the workspace.
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

// abar_l for samples [m0, m1): [mc, n_l (+1 with a bias)].
inline at::Tensor augmented_input(const Stack& s, const Forward& f, int64_t l, int64_t m0, int64_t mc) {
  const at::Tensor a = f.a[l].narrow(0, m0, mc);
  return s.b[l].defined() ? at::cat({a, at::ones({mc, 1}, a.options())}, 1) : a;
}

// Parameter offsets in the stack-order flat layout: W_l at woff[l] ([o, i] row-major), b_l at boff[l].
struct FlatOffsets {
  std::vector<int64_t> woff, boff;
  int64_t total = 0;
  explicit FlatOffsets(const Stack& s, bool per_layer) {
    for (int64_t l = 0; l < s.L; ++l) {
      if (per_layer) total = 0;
      woff.push_back(total);
      total += s.W[l].numel();
      boff.push_back(s.b[l].defined() ? total : -1);
      if (s.b[l].defined()) total += s.W[l].size(0);
    }
  }
};

// Adds a block [o, ibar, p, jbar] (rows: layer l, columns: layer k) into H at the parameter offsets.
inline void add_block(at::Tensor& H, const at::Tensor& block, const Stack& s, int64_t l, int64_t k, int64_t rw,
                      int64_t rb, int64_t cw, int64_t cb) {
  const int64_t o = s.W[l].size(0), i = s.W[l].size(1), p = s.W[k].size(0), j = s.W[k].size(1);
  auto sub = [&](int64_t r0, int64_t nr0, int64_t nr1, int64_t c0, int64_t nc0, int64_t nc1) {
    return H.narrow(0, r0, nr0 * nr1).narrow(1, c0, nc0 * nc1).view({nr0, nr1, nc0, nc1});
  };
  sub(rw, o, i, cw, p, j).add_(block.narrow(1, 0, i).narrow(3, 0, j));
  if (cb >= 0) sub(rw, o, i, cb, p, 1).add_(block.narrow(1, 0, i).narrow(3, j, 1));
  if (rb >= 0) sub(rb, o, 1, cw, p, j).add_(block.narrow(1, i, 1).narrow(3, 0, j));
  if (rb >= 0 && cb >= 0) sub(rb, o, 1, cb, p, 1).add_(block.narrow(1, i, 1).narrow(3, j, 1));
}

// Averages a square block with its transpose in place, tile by tile (no temporary of the block's size).
inline void symmetrize_square_(at::Tensor S) {
  constexpr int64_t kTile = 256;
  const int64_t n = S.size(0);
  for (int64_t r = 0; r < n; r += kTile)
    for (int64_t c = r; c < n; c += kTile) {
      const int64_t nr = std::min(kTile, n - r), nc = std::min(kTile, n - c);
      at::Tensor upper = S.narrow(0, r, nr).narrow(1, c, nc), lower = S.narrow(0, c, nc).narrow(1, r, nr);
      const at::Tensor mean = (upper + lower.t()).mul_(0.5);
      upper.copy_(mean);
      lower.copy_(mean.t());
    }
}

// Exact symmetry for a Hessian whose blocks k <= l are filled (stack order): each diagonal block is
// averaged with its transpose, each block above the diagonal is the transpose of the one below.
inline void symmetrize_from_lower(at::Tensor& H, const Stack& s) {
  int64_t r0 = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t Pl = s.W[l].numel() + (s.b[l].defined() ? s.W[l].size(0) : 0);
    symmetrize_square_(H.narrow(0, r0, Pl).narrow(1, r0, Pl));
    if (r0 > 0) H.narrow(0, 0, r0).narrow(1, r0, Pl).copy_(H.narrow(0, r0, Pl).narrow(1, 0, r0).t());
    r0 += Pl;
  }
}

// The dense Hessian in stack order: one [P, P] matrix, or (layer_only) one [P_l, P_l] per layer.
// Memory: the block accumulators and one chunk workspace while the samples are summed (float32 blocks
// accumulate in float64, so that a large batch costs no accuracy), then H while the accumulators are
// scattered into it and freed one by one; no temporary of H's size. hessext.hessians estimates this
// peak before the call.
template <class E>
std::vector<at::Tensor> hessian(const Stack& s, bool layer_only, int64_t chunk_elems) {
  const int64_t M = s.M, L = s.L;
  const Forward f = forward<E>(s);
  const LossHead head = loss_head<E>(s, f.a[L]);
  const Backward g = backward(s, f, head);
  const FlatOffsets off(s, layer_only);
  const bool widen = s.x.scalar_type() == at::kFloat;
  const auto acc_opts = s.x.options().dtype(widen ? at::kDouble : s.x.scalar_type());
  // samples per chunk: T holds mc * o * ibar * p elements
  int64_t widest = 1;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t k = 0; k <= l; ++k) widest = std::max(widest, s.W[l].size(0) * (s.W[l].size(1) + 1) * s.W[k].size(0));
  // float32: short sums per chunk (kWidenedChunk samples), the chunks summed in float64
  const int64_t mc_max = std::max<int64_t>(1, std::min<int64_t>(widen ? kWidenedChunk : M, std::min<int64_t>(M, chunk_elems / widest)));

  // One accumulator per block pair (k <= l) in the GEMM's natural layout [(o, ibar, p), jbar], extended
  // by every chunk and scattered into H once; one reused workspace for T.
  std::vector<at::Tensor> acc;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t k = 0; k <= l; ++k) {
      const bool wanted = k == l || !layer_only;
      const int64_t rows = s.W[l].size(0) * (s.W[l].size(1) + 1) * s.W[k].size(0);
      acc.push_back(wanted ? at::zeros({rows, s.W[k].size(1) + 1}, acc_opts) : at::Tensor());
    }
  auto pair = [](int64_t l, int64_t k) { return l * (l + 1) / 2 + k; };
  auto accumulate = [&](at::Tensor block, const at::Tensor& T, const at::Tensor& abar) {
    if (widen) {
      block.add_(hx::mm(T.t(), abar));
    } else {
      hx::addmm_(block, T.t(), abar);
    }
  };
  {
    at::Tensor work = at::empty({mc_max * widest}, s.x.options());
    for (int64_t m0 = 0; m0 < M; m0 += mc_max) {
      const int64_t mc = std::min(mc_max, M - m0);
      const std::vector<at::Tensor> G = pre_activation_hessians(s, f, g, head, m0, mc + m0);
      std::vector<at::Tensor> abar(L);
      for (int64_t l = 0; l < L; ++l) abar[l] = augmented_input(s, f, l, m0, mc);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t o = s.W[l].size(0), n = s.W[l].size(1), ib = abar[l].size(1);
        // k = l: T[m, o, ibar, p] = G_l[m, o, p] abar_l[m, ibar]
        at::Tensor T = work.narrow(0, 0, mc * o * ib * o).view({mc, o, ib, o});
        at::mul_out(T, G[l].unsqueeze(2), abar[l].unsqueeze(1).unsqueeze(3));
        accumulate(acc[pair(l, l)].narrow(0, 0, o * ib * o).narrow(1, 0, ib), T.view({mc, -1}), abar[l]);
        if (layer_only || l == 0) continue;
        const at::Tensor GW = at::matmul(G[l], s.W[l]);  // [mc, o, n_l]
        const at::Tensor delta = g.delta[l].narrow(0, m0, mc);
        at::Tensor A = f.d[l].defined() ? at::diag_embed(f.d[l].narrow(0, m0, mc))
                                        : at::eye(n, s.x.options()).expand({mc, n, n});  // A_{l,l-1}
        for (int64_t k = l - 1; k >= 0; --k) {
          const int64_t p = s.W[k].size(0), jb = abar[k].size(1);
          at::Tensor Tk = work.narrow(0, 0, mc * o * ib * p).view({mc, o, ib, p});
          at::mul_out(Tk, at::matmul(GW, A).unsqueeze(2), abar[l].unsqueeze(1).unsqueeze(3));
          Tk.narrow(2, 0, n).addcmul_(delta.unsqueeze(2).unsqueeze(3), A.unsqueeze(1));
          accumulate(acc[pair(l, k)].narrow(0, 0, o * ib * p).narrow(1, 0, jb), Tk.view({mc, -1}), abar[k]);
          if (k > 0) {  // A_{l,k-1} = A_{l,k} W_k D_k
            A = at::matmul(A, s.W[k]);
            if (f.d[k].defined()) A.mul_(f.d[k].narrow(0, m0, mc).unsqueeze(1));
          }
        }
      }
    }
  }
  std::vector<at::Tensor> H;
  if (layer_only) {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t Pl = s.W[l].numel() + (s.b[l].defined() ? s.W[l].size(0) : 0);
      H.push_back(at::zeros({Pl, Pl}, s.x.options()));
    }
  } else {
    H.push_back(at::zeros({off.total, off.total}, s.x.options()));
  }
  for (int64_t l = 0; l < L; ++l)
    for (int64_t k = 0; k <= l; ++k) {
      if (!acc[pair(l, k)].defined()) continue;
      const int64_t o = s.W[l].size(0), ib = s.W[l].size(1) + (s.b[l].defined() ? 1 : 0);
      const int64_t p = s.W[k].size(0), jb = s.W[k].size(1) + (s.b[k].defined() ? 1 : 0);
      const at::Tensor block =
          acc[pair(l, k)].narrow(0, 0, o * ib * p).narrow(1, 0, jb).reshape({o, ib, p, jb}).to(s.x.scalar_type());
      add_block(H[layer_only ? l : 0], block, s, l, k, off.woff[l], off.boff[l], off.woff[k], off.boff[k]);
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
  at::Tensor out = diagonal ? at::empty({M, d}, s.x.options()) : at::empty({M, d, d}, s.x.options());
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

// Laplacians (mode 0) and input Hessians (1: diagonal, 2: full) by whichever method costs less:
// the jets of jets.h, M sum_l n_l n_{l+1} (1+d+q), or the backward recurrence, M (sum n^3 + n_1^2 d).
template <class E>
at::Tensor input_derivatives_any(const Stack& s, int64_t mode, int64_t chunk_elems) {
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0 (Laplacian), 1 (diagonal) or 2 (full), got ", mode);
  const JetMode jm = static_cast<JetMode>(mode);
  if (jm != JetMode::Laplacian) {
    const int64_t d = s.width(0), q = jet_channels(jm, d);
    int64_t jets = 0, back = s.width(1) * s.width(1) * d;
    for (int64_t l = 0; l < s.L; ++l) {
      jets += s.width(l) * s.width(l + 1) * (1 + d + q);
      if (l > 0) back += 2 * s.width(l) * s.width(l + 1) * s.width(l + 1);
    }
    if (back < jets) return input_hessian_backward<E>(s, jm == JetMode::Diagonal, chunk_elems);
  }
  return input_derivatives<E>(s, jm);
}

}  // namespace hessext
