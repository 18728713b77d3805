// Per-sample recurrences for narrow stacks, written once for the CPU loops and the CUDA kernels
// (host/device functions on raw pointers). Indices as in stack.h: one sample, layer l maps a_l
// (width n_l) to z_l (width n_{l+1}); W_l row-major [o, i].
//
// Per-sample scratch holds one value per unit of every layer, layer l at offset off[l]:
//   a     activations a_0..a_L (a_L the output),
//   d     phi'(z) of the activation that produced a (1 for the input, the output and identity),
//   d2    phi''(z) of that activation (0 where it is piecewise linear),
//   delta dLoss/dz_{l-1} at off[l] (so delta_l, of width n_{l+1}, sits at off[l+1]),
//   e     dLoss/da_l at off[l],
// the loss head (losses.h) h [C] and w = head[C], and for products Rz (pre-activation R-values,
// same layout with K values per unit) and two rows of [max n, K].
#pragma once
#include <cstdint>

#include "losses.h"

namespace hessext {
namespace fused {

constexpr int kMaxLayers = 16;

template <typename T>
struct Net {
  int L;
  int n[kMaxLayers + 1];    // widths n_0..n_L
  int off[kMaxLayers + 2];  // scratch offsets, off[L+1] = total units
  int maxw;
  const T* W[kMaxLayers];
  const T* b[kMaxLayers];  // nullptr: no bias
  Act act[kMaxLayers];     // activation after layer l (Identity after the last)
  T p0[kMaxLayers], p1[kMaxLayers];
  Loss loss;
  T loss_param, scale;
};

// One sample's scratch (layout above), carved from `base`; `end()` is where the caller's own rows start.
// S: the per-sample value type, T itself, or W samples side by side in SIMD lanes (cpu/lanes.h).
template <typename S>
struct Sample {
  S *a, *d, *d2, *delta, *e, *head;
  template <typename T>
  HX_HD static int64_t size(const Net<T>& net) {
    return 5 * int64_t(net.off[net.L + 1]) + net.n[net.L] + 1;
  }
  template <typename T>
  HX_HD Sample(const Net<T>& net, S* base) {
    const int U = net.off[net.L + 1];
    a = base, d = a + U, d2 = d + U, delta = d2 + U, e = delta + U, head = e + U;
  }
  template <typename T>
  HX_HD S* end(const Net<T>& net) const {
    return head + net.n[net.L] + 1;
  }
};

// The product vectors per layer, and where each layer's products go in one flat accumulator row of
// the P parameters (slot order) times K: V_l [o, i, K], vb_l [o, K] (nullptr: no bias), and the
// slots' offsets in P (offb -1: no bias). The CPU lanes run groups of 4 vectors (K = 4, their entries
// interleaved into this layout) and the rest one at a time (K = 1, each vector's V_l [o, i] and vb_l
// [o] found from the [K, numel] slots as given).
template <typename T>
struct LayerVectors {
  const T* V[kMaxLayers];
  const T* vb[kMaxLayers];
  int64_t offW[kMaxLayers], offb[kMaxLayers];
  // HW_l and Hb_l inside `row` (S: the accumulators' type).
  template <typename S>
  HX_HD void targets(int L, int K, S* row, S** HW, S** Hb) const {
    for (int l = 0; l < L; ++l) {
      HW[l] = row + offW[l] * K;
      Hb[l] = offb[l] >= 0 ? row + offb[l] * K : nullptr;
    }
  }
};

// Forward: z_l = W_l a_l + b_l;  a_{l+1} = phi_l(z_l), d_{l+1} = phi_l'(z_l), d2_{l+1} = phi_l''(z_l).
template <typename T>
HX_HD void forward(const Net<T>& net, const T* x, T* a, T* d, T* d2) {
  for (int j = 0; j < net.n[0]; ++j) a[j] = x[j], d[j] = T(1), d2[j] = T(0);
  for (int l = 0; l < net.L; ++l) {
    const int ni = net.n[l], no = net.n[l + 1];
    const T* in = a + net.off[l];
    for (int o = 0; o < no; ++o) {
      const T* w = net.W[l] + o * ni;
      T acc = net.b[l] ? net.b[l][o] : T(0);
      for (int i = 0; i < ni; ++i) acc += w[i] * in[i];
      const int u = net.off[l + 1] + o;
      act_eval(net.act[l], net.p0[l], net.p1[l], acc, a[u], d[u], d2[u]);
    }
  }
}

// The loss row at the output: delta_{L-1} = g at off[L], the output Hessian in head (h [C], w = head[C]).
template <typename T>
HX_HD void loss(const Net<T>& net, const T* a, const T* y, T* delta, T* head) {
  const int C = net.n[net.L];
  loss_row(net.loss, net.loss_param, net.scale, C, a + net.off[net.L], y, delta + net.off[net.L], head, head + C);
}

// Backward through the activations from delta_{L-1} (fused::loss): e_l = W_l^T delta_l;
// delta_{l-1} = d_l * e_l.
template <typename T, typename S = T>
HX_HD void backward(const Net<T>& net, const S* d, S* delta, S* e) {
  for (int l = net.L - 1; l >= 1; --l) {
    const int ni = net.n[l], no = net.n[l + 1];
    const S* dl = delta + net.off[l + 1];
    S* el = e + net.off[l];
    for (int i = 0; i < ni; ++i) el[i] = S(0);
    for (int o = 0; o < no; ++o) {
      const T* w = net.W[l] + o * ni;
      const S g = dl[o];
      for (int i = 0; i < ni; ++i) el[i] += g * w[i];
    }
    S* dprev = delta + net.off[l];
    for (int i = 0; i < ni; ++i) dprev[i] = d[net.off[l] + i] * el[i];
  }
}

// K vectors (V_l, vb_l) for one sample, accumulated into HW_l and Hb_l (recurrence in hvp.h), with
// Rz the pre-activation R-values and Ra_l = d_l Rz_{l-1} formed on the fly:
//   Rz_l = W_l (d_l Rz_{l-1}) + V_l a_l + vb_l;  Rdelta_{L-1} = H_out Rz_{L-1}  (the loss head)
//   HW_l += Rdelta_l a_l^T + delta_l (d_l Rz_{l-1})^T;  Hb_l += Rdelta_l
//   Re_l = W_l^T Rdelta_l + V_l^T delta_l;  Rdelta_{l-1} = d_l Re_l + d2_l e_l Rz_{l-1}
// Layouts: V_l: [o, i, K], vb_l: [o, K], HW_l: [o, i, K], Hb_l: [o, K]; Rz: [units, K]; r0, r1:
// [max n, K]. Each R-value and Re entry is summed in a local accumulator (a register for KC = 1, not
// a chain of stores and loads through the scratch).
// KC > 0 fixes K at compile time (KC = 1 makes the single-vector loops plain scalar code); KC > 1
// sums the KC vectors' R-values and Re entries side by side in KC accumulators, so that each sample
// value and weight is loaded once for all of them (the CPU lanes' groups of 4 vectors).
// GGN drops every delta and d2 term: the GGN-vector product J^T H_out J v (delta, e unused).
// S: the per-sample value type (Sample); the weights and vectors are T, the accumulators S.
template <typename T, int KC = 0, bool GGN = false, typename S = T>
HX_HD void hvp_sample(const Net<T>& net, int K_runtime, const S* a, const S* d, const S* d2, const S* delta, const S* e,
                      const S* head, const T* const* V, const T* const* vb, S* Rz, S* r0, S* r1, S* const* HW,
                      S* const* Hb) {
  const int L = net.L, C = net.n[L];
  const int K = KC > 0 ? KC : K_runtime;
  for (int l = 0; l < L; ++l) {
    const int ni = net.n[l], no = net.n[l + 1];
    const S* in = a + net.off[l];
    const S* din = d + net.off[l];
    const S* rin = Rz + net.off[l] * K;
    for (int o = 0; o < no; ++o) {
      const T* v = V[l] + o * ni * K;
      const T* w = net.W[l] + o * ni;
      if constexpr (KC > 1) {  // the KC sums side by side: each a_i, d_i W_i loaded once for all of them
        S acc[KC > 1 ? KC : 1];
        for (int k = 0; k < K; ++k) acc[k] = vb[l] ? S(vb[l][o * K + k]) : S(0);
        for (int i = 0; i < ni; ++i) {
          const S x = in[i];
          if (l > 0) {
            const S wd = w[i] * din[i];
            for (int k = 0; k < K; ++k) acc[k] += v[i * K + k] * x + wd * rin[i * K + k];
          } else {
            for (int k = 0; k < K; ++k) acc[k] += v[i * K + k] * x;
          }
        }
        for (int k = 0; k < K; ++k) Rz[(net.off[l + 1] + o) * K + k] = acc[k];
        continue;
      }
      for (int k = 0; k < K; ++k) {
        S acc = vb[l] ? S(vb[l][o * K + k]) : S(0);
        for (int i = 0; i < ni; ++i) {
          acc += v[i * K + k] * in[i];
          if (l > 0) acc += (w[i] * din[i]) * rin[i * K + k];
        }
        Rz[(net.off[l + 1] + o) * K + k] = acc;
      }
    }
  }
  S* rd = r0;
  S* re = r1;
  loss_hessian_apply(net.loss, C, K, head, head[C], Rz + net.off[L] * K, rd);
  for (int l = L - 1; l >= 0; --l) {
    const int ni = net.n[l], no = net.n[l + 1];
    const S* in = a + net.off[l];
    const S* din = d + net.off[l];
    const S* rin = Rz + net.off[l] * K;
    const S* dl = GGN ? nullptr : delta + net.off[l + 1];
    for (int o = 0; o < no; ++o) {
      const S* __restrict__ r = rd + o * K;
      const S g = GGN ? S(0) : dl[o];
      for (int i = 0; i < ni; ++i) {
        S* __restrict__ hw = HW[l] + (o * ni + i) * K;
        const S ai = in[i];
        if (l > 0 && !GGN) {
          const S gd = g * din[i];
          const S* __restrict__ ri = rin + i * K;
          for (int k = 0; k < K; ++k) hw[k] += r[k] * ai + gd * ri[k];
        } else {
          for (int k = 0; k < K; ++k) hw[k] += r[k] * ai;
        }
      }
      if (Hb[l]) {
        S* __restrict__ hb = Hb[l] + o * K;
        for (int k = 0; k < K; ++k) hb[k] += r[k];
      }
    }
    if (l == 0) break;
    for (int i = 0; i < ni; ++i) {
      const S dd = din[i], c = GGN ? S(0) : d2[net.off[l] + i] * e[net.off[l] + i];
      if constexpr (KC > 1) {  // the KC sums side by side: each W_oi, delta_o loaded once for all of them
        S acc[KC > 1 ? KC : 1];
        for (int k = 0; k < K; ++k) acc[k] = S(0);
        for (int o = 0; o < no; ++o) {
          const T w = net.W[l][o * ni + i];
          const T* v = V[l] + (o * ni + i) * K;
          if (GGN) {
            for (int k = 0; k < K; ++k) acc[k] += rd[o * K + k] * w;
          } else {
            const S g = dl[o];
            for (int k = 0; k < K; ++k) acc[k] += rd[o * K + k] * w + g * v[k];
          }
        }
        for (int k = 0; k < K; ++k) re[i * K + k] = dd * acc[k] + c * rin[i * K + k];
        continue;
      }
      for (int k = 0; k < K; ++k) {
        S acc = S(0);
        for (int o = 0; o < no; ++o) {
          const T w = net.W[l][o * ni + i];
          if (GGN) {
            acc += rd[o * K + k] * w;
          } else {
            acc += rd[o * K + k] * w + dl[o] * V[l][(o * ni + i) * K + k];
          }
        }
        re[i * K + k] = dd * acc + c * rin[i * K + k];
      }
    }
    S* t = rd;
    rd = re;
    re = t;
  }
}

// out [no, ni] = G [no, no] @ W [no, ni] (row-major).
template <typename T>
HX_HD void g_times_w(const T* G, const T* W, int no, int ni, T* out) {
  for (int o = 0; o < no; ++o)
    for (int i = 0; i < ni; ++i) {
      T acc = T(0);
      for (int q = 0; q < no; ++q) acc += G[o * no + q] * W[q * ni + i];
      out[o * ni + i] = acc;
    }
}

// Exact Hessian (or GGN) diagonal for one sample, accumulated into HW_l [o, i] and Hb_l [o]
// (recurrence in diag.h, with each sample's G_l held whole, [n_{l+1}, n_{l+1}] row-major):
//   G_{L-1} = H_out (the loss head);  HW_l += G_l[o, o] a_l[i]^2;  Hb_l += G_l[o, o]
//   T = G_l W_l;  G_{l-1} = D_l W_l^T T D_l + diag(R_{l-1}),  R_{l-1} = d2_l e_l (0 for the GGN)
// The last step (to G_0) forms only its diagonal. Scratch: G, Gn of max n^2, T of max n^2.
// Acc: the accumulators' type (float64 for float32 sums over many samples on the CPU).
template <typename T, typename Acc = T>
HX_HD void diag_sample(const Net<T>& net, bool ggn, const T* a, const T* d, const T* d2, const T* e, const T* head,
                       T* G, T* Gn, T* Tm, Acc* const* HW, Acc* const* Hb) {
  const int L = net.L, C = net.n[L];
  loss_hessian_dense(net.loss, C, head, head[C], G);
  for (int l = L - 1; l >= 0; --l) {
    const int ni = net.n[l], no = net.n[l + 1];
    const T* in = a + net.off[l];
    for (int o = 0; o < no; ++o) {
      const T g = G[o * no + o];
      Acc* hw = HW[l] + o * ni;
      for (int i = 0; i < ni; ++i) hw[i] += g * in[i] * in[i];
      if (Hb[l]) Hb[l][o] += g;
    }
    if (l == 0) break;
    const T* W = net.W[l];
    g_times_w(G, W, no, ni, Tm);  // Tm = G W: [o, i]
    const T* dd = d + net.off[l];
    const T* dd2 = d2 + net.off[l];
    const T* el = e + net.off[l];
    const bool last = (l - 1 == 0);
    for (int i = 0; i < ni; ++i)
      for (int j = last ? i : 0; j < (last ? i + 1 : ni); ++j) {
        T acc = T(0);
        for (int o = 0; o < no; ++o) acc += W[o * ni + i] * Tm[o * ni + j];
        acc *= dd[i] * dd[j];
        if (i == j && !ggn) acc += dd2[i] * el[i];
        Gn[i * ni + j] = acc;
      }
    if (last)  // keep only the diagonal, in the row-major positions the next round reads
      for (int i = 0; i < ni; ++i) G[i * ni + i] = Gn[i * ni + i];
    else
      for (int p = 0; p < ni * ni; ++p) G[p] = Gn[p];
  }
}

// y[q] += alpha x[q], q < n (x and y do not overlap).
template <typename T>
HX_HD void axpy(int64_t n, T alpha, const T* __restrict__ x, T* __restrict__ y) {
  for (int64_t q = 0; q < n; ++q) y[q] += alpha * x[q];
}

// The dense Hessian contribution of one sample (hessian.h's decomposition with the sample's G_l and
// A_{l,k} held whole), added to the blocks k <= l of H [P, P] (stack order; the caller mirrors).
//   G_{L-1} = H_out (the loss head);  G_{l-1} = D_l W_l^T G_l W_l D_l + diag(d2_l e_l)
//   H_ll[(o,i),(p,j)] += G_l[o,p] abar_l[i] abar_l[j]
//   H_lk[(o,i),(p,j)] += ((G_l W_l A)[o,p] abar_l[i] + delta_l[o] A[i,p]) abar_k[j],
//   A = A_{l,k}: A_{l,l-1} = D_l, A_{l,k-1} = A_{l,k} W_k D_k;  abar = [a, 1] with a bias (A's bias row 0)
// Scratch: G and GW (= G_l W_l, formed once in the recurrence and reused by the cross blocks) of
// L max n^2 each, and A, An, B of max n^2 each. woff/boff: parameter offsets (-1: no bias).
template <typename T>
HX_HD void hessian_sample(const Net<T>& net, const T* a, const T* d, const T* d2, const T* delta, const T* e,
                          const T* head, T* G, T* GWs, T* A, T* An, T* B, const int64_t* woff, const int64_t* boff,
                          int64_t P, T* H) {
  const int L = net.L, W2 = net.maxw * net.maxw;
  loss_hessian_dense(net.loss, net.n[L], head, head[net.n[L]], G + (L - 1) * W2);
  for (int l = L - 1; l >= 1; --l) {  // G_{l-1} from G_l
    const int ni = net.n[l], no = net.n[l + 1];
    T* Gp = G + (l - 1) * W2;
    const T* W = net.W[l];
    T* GW = GWs + l * W2;
    g_times_w(G + l * W2, W, no, ni, GW);
    const T* dd = d + net.off[l];
    for (int i = 0; i < ni; ++i)
      for (int j = 0; j < ni; ++j) {
        T acc = T(0);
        for (int o = 0; o < no; ++o) acc += W[o * ni + i] * GW[o * ni + j];
        acc *= dd[i] * dd[j];
        if (i == j) acc += d2[net.off[l] + i] * e[net.off[l] + i];
        Gp[i * ni + j] = acc;
      }
  }
  for (int l = 0; l < L; ++l) {
    const int ni = net.n[l], no = net.n[l + 1], ib = ni + (boff[l] >= 0 ? 1 : 0);
    const T* al = a + net.off[l];
    const T* Gl = G + l * W2;
    auto row = [&](int o, int i) { return i < ni ? woff[l] + int64_t(o) * ni + i : boff[l] + o; };
    for (int o = 0; o < no; ++o) {  // H_ll: row (o, i) gains abar_l[i] u, u[(p, j)] = G_l[o, p] a_l[j]
      T* __restrict__ u = B;        // W_l's columns are contiguous in (p, j): one long axpy per row
      for (int p = 0; p < no; ++p)
        for (int j = 0; j < ni; ++j) u[p * ni + j] = Gl[o * no + p] * al[j];
      for (int i = 0; i < ib; ++i) {
        T* h = H + row(o, i) * P;
        const T ai = i < ni ? al[i] : T(1);
        axpy(no * ni, ai, u, h + woff[l]);
        if (boff[l] >= 0) axpy(no, ai, Gl + o * no, h + boff[l]);
      }
    }
    if (l == 0) continue;
    const T* GW = GWs + l * W2;   // G_l W_l [o, n_l], from the recurrence
    for (int i = 0; i < ni; ++i)  // A = A_{l,l-1} = D_l
      for (int p = 0; p < ni; ++p) A[i * ni + p] = i == p ? d[net.off[l] + i] : T(0);
    const T* dl = delta + net.off[l + 1];
    for (int k = l - 1; k >= 0; --k) {
      const int nk = net.n[k], np = net.n[k + 1];
      const T* ak = a + net.off[k];
      for (int o = 0; o < no; ++o)  // B = GW A [o, np]
        for (int p = 0; p < np; ++p) {
          T acc = T(0);
          for (int i = 0; i < ni; ++i) acc += GW[o * ni + i] * A[i * np + p];
          B[o * np + p] = acc;
        }
      for (int o = 0; o < no; ++o)
        for (int i = 0; i < ib; ++i) {
          T* h = H + row(o, i) * P;
          const T ai = i < ni ? al[i] : T(1);
          T* __restrict__ c = An;  // c[p], the row's coefficient of abar_k
          for (int p = 0; p < np; ++p) c[p] = B[o * np + p] * ai + (i < ni ? dl[o] * A[i * np + p] : T(0));
          if (nk == 1) {  // W_k's columns (p, 0) are contiguous: one axpy
            axpy(np, ak[0], c, h + woff[k]);
          } else {
            for (int p = 0; p < np; ++p) axpy(nk, c[p], ak, h + woff[k] + int64_t(p) * nk);
          }
          if (boff[k] >= 0) axpy(np, T(1), c, h + boff[k]);
        }
      if (k > 0) {  // A_{l,k-1} = A_{l,k} W_k D_k: [n_l, n_k]
        for (int i = 0; i < ni; ++i)
          for (int q = 0; q < nk; ++q) {
            T acc = T(0);
            for (int p = 0; p < np; ++p) acc += A[i * np + p] * net.W[k][p * nk + q];
            An[i * nk + q] = acc * d[net.off[k] + q];
          }
        for (int j = 0; j < ni * nk; ++j) A[j] = An[j];
      }
    }
  }
}

}  // namespace fused
}  // namespace hessext
