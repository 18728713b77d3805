// Fused elementwise steps of the stack recurrences on the CPU, one pass each, parallel over rows m, the
// loops compiled for this CPU's vectors (run_simd).
// Shapes: per-sample tensors [M, w]; R-quantities [M, K, w] (contiguous).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu/exp_cpu.h"
#include "cpu/lanes.h"
#include "stack.h"

namespace hessext {

// tanh (of the doubled input) or sigmoid through exp_cpu.h, in T's own arithmetic.
template <typename T, Act kind, bool second>
void of_exp(T* __restrict__ a, T* __restrict__ d1, T* __restrict__ d2, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T v = kind == Act::Tanh ? tanh_of_doubled(a[j]) : sigmoid_of_exp(a[j]);
    T first, curv;
    act_derivatives_of_value(kind, v, first, curv);
    a[j] = v;
    d1[j] = first;
    if constexpr (second) d2[j] = curv;
  }
}

// n pre-activations a (scaled by CpuElementwise::input_scale(kind)) -> the values in place, d1, d2 (nullptr: not
// stored). tanh and sigmoid: e^y of exp_cpu.h, then the derivatives from the value
// (act_derivatives_of_value, the formulas act_eval uses), in a loop compiled for this CPU's vectors
// (run_simd); tanh z = 1 - 2 / (1 + e^(2 z)) takes its doubled input from the forward product.
// Every other row is one scalar pass of act_eval.
template <typename T>
void act_rows(Act kind, double p0, double p1, T* a, T* d1, T* d2, int64_t n) {
  switch (kind) {
    case Act::Tanh:
      return d2 ? run_simd([&] { of_exp<T, Act::Tanh, true>(a, d1, d2, n); })
                : run_simd([&] { of_exp<T, Act::Tanh, false>(a, d1, d2, n); });
    case Act::Sigmoid:
      return d2 ? run_simd([&] { of_exp<T, Act::Sigmoid, true>(a, d1, d2, n); })
                : run_simd([&] { of_exp<T, Act::Sigmoid, false>(a, d1, d2, n); });
    default:
      const T q0 = static_cast<T>(p0), q1 = static_cast<T>(p1);
      T second = 0;
      for (int64_t j = 0; j < n; ++j) {
        act_eval(kind, q0, q1, a[j], a[j], d1[j], second);
        if (d2) d2[j] = second;
      }
  }
}

// v [M, O] -> scale (v + b), b [O] or null.
template <typename T>
void add_bias_scaled(T* __restrict__ v, const T* __restrict__ b, T scale, int64_t M, int64_t O) {
  for (int64_t m = 0; m < M; ++m) {
    T* __restrict__ row = v + m * O;
    if (b) {
      for (int64_t u = 0; u < O; ++u) row[u] = scale * (row[u] + b[u]);
    } else {
      for (int64_t u = 0; u < O; ++u) row[u] *= scale;
    }
  }
}

// The jet activation step (CpuElementwise::jet_activation) over samples [lo, hi) of z [1 + d + q, M, O]
// (channel stride n = M O), tile by tile of whole rows so that the tiles the loops revisit stay in a
// 32 kB L1: the value channel v -> phi(scale (v + b)) with phi' dd and phi'' p2 [M, O] beside it
// (act_rows), then the channels, each loop compiled for this CPU's vectors (run_simd). The Laplacian's
// sum channel takes each J_i in one pass (S += phi'' J_i^2, J_i = phi' J_i), revisiting only S, phi'
// and phi''; the other modes form every S_(i,j) from the unscaled J first.
template <typename T>
struct JetStep {
  T *z, *dd, *p2;
  const T* bias;  // [O] or null
  T scale;
  Act kind;
  double p0, p1;
  int64_t M, O, d;
  bool sum_channel;
  const std::vector<std::pair<int64_t, int64_t>>& pairs;

  void run(int64_t lo, int64_t hi) const {
    const int64_t n = M * O, revisited = sum_channel ? 5 : d + static_cast<int64_t>(pairs.size()) + 3;
    const int64_t rows = std::max<int64_t>(1, 32768 / (revisited * static_cast<int64_t>(sizeof(T)) * O));
    for (int64_t r0 = lo; r0 < hi; r0 += rows) {
      const int64_t count = std::min(rows, hi - r0), t0 = r0 * O, len = count * O;
      if (bias || scale != T(1)) run_simd([&] { add_bias_scaled(z + t0, bias, scale, count, O); });
      act_rows<T>(kind, p0, p1, z + t0, dd + t0, p2 + t0, len);
      run_simd([&] { channels(z + n + t0, z + (1 + d) * n + t0, dd + t0, p2 + t0, len); });
    }
  }

  // J [d] and S [q] channels (stride n) of one tile of len elements, given its phi' d1 and phi'' d2.
  void channels(T* J, T* S, const T* __restrict__ d1, const T* __restrict__ d2, int64_t len) const {
    const int64_t n = M * O;
    if (sum_channel) {
      T* __restrict__ S0 = S;
      for (int64_t m = 0; m < len; ++m) S0[m] *= d1[m];
      for (int64_t i = 0; i < d; ++i) {
        T* __restrict__ Ji = J + i * n;
        for (int64_t m = 0; m < len; ++m) {
          const T j = Ji[m];
          S0[m] += d2[m] * j * j;
          Ji[m] = d1[m] * j;
        }
      }
      return;
    }
    for (size_t k = 0; k < pairs.size(); ++k) {
      T* __restrict__ Sk = S + static_cast<int64_t>(k) * n;
      const T *Ji = J + pairs[k].first * n, *Jj = J + pairs[k].second * n;
      for (int64_t m = 0; m < len; ++m) Sk[m] = d1[m] * Sk[m] + d2[m] * Ji[m] * Jj[m];
    }
    for (int64_t i = 0; i < d; ++i) {
      T* __restrict__ Ji = J + i * n;
      for (int64_t m = 0; m < len; ++m) Ji[m] *= d1[m];
    }
  }
};

// phi', phi'', phi''' of len pre-activations z (a = phi(z) beside them): tanh and sigmoid from the
// values a in a loop compiled for this CPU's vectors (the row fixed), every other row from z through
// act_eval. For the jets' reverse and tangent steps.
template <typename T, Act K>
void of_value(const T* __restrict__ a, T* __restrict__ d1, T* __restrict__ d2, T* __restrict__ d3, int64_t len) {
  for (int64_t m = 0; m < len; ++m) {
    T first, second;
    act_derivatives_of_value(K, a[m], first, second);
    d1[m] = first, d2[m] = second, d3[m] = act_third(K, T(0), T(0), a[m], first, second);
  }
}

template <typename T>
void jet_derivatives(Act kind, double p0, double p1, const T* z, const T* a, T* d1, T* d2, T* d3, int64_t len) {
  if (kind == Act::Tanh) return run_simd([&] { of_value<T, Act::Tanh>(a, d1, d2, d3, len); });
  if (kind == Act::Sigmoid) return run_simd([&] { of_value<T, Act::Sigmoid>(a, d1, d2, d3, len); });
  const T q0 = static_cast<T>(p0), q1 = static_cast<T>(p1);
  for (int64_t m = 0; m < len; ++m) {
    T value = a[m], first = T(0), second = T(0);
    act_eval(kind, q0, q1, z[m], value, first, second);
    d1[m] = first, d2[m] = second, d3[m] = act_third(kind, q0, z[m], value, first, second);
  }
}

// The reverse of the jet activation step (CpuElementwise::jet_activation_backward) over samples
// [lo, hi) of G, Z, A [1 + k + q, M, O] (channel stride n = M O), in tiles of about 512 elements, so that
// the tile's five buffers (phi', phi'', phi''', the dot and the sum of squares, 20 kB in float64) stay in L1
// while G, Z and A stream past them.
template <typename T>
struct JetReverse {
  T* G;
  const T *Z, *A;
  Act kind;
  double p0, p1;
  int64_t M, O, k;
  bool sum_channel;
  const std::vector<std::pair<int64_t, int64_t>>& pairs;

  void run(int64_t lo, int64_t hi) const {
    const int64_t n = M * O, rows = std::max<int64_t>(1, 512 / O);
    std::vector<T> buffer(5 * rows * O);
    for (int64_t r0 = lo; r0 < hi; r0 += rows) {
      const int64_t t0 = r0 * O, len = std::min(rows, hi - r0) * O;
      T *d1 = buffer.data(), *d2 = d1 + len, *d3 = d2 + len, *dot = d3 + len, *extra = dot + len;
      jet_derivatives(kind, p0, p1, Z + t0, A + t0, d1, d2, d3, len);
      run_simd([&] {
        if (sum_channel) {
          sum_channels(G + t0, Z + t0, d1, d2, d3, dot, extra, n, len);
        } else {
          pair_channels(G + t0, Z + t0, d1, d2, d3, dot, extra, n, len);
        }
      });
    }
  }

  // The Laplacian's sum channel S (the pairs (i, i) summed): dJz_i = phi' dJa_i + 2 phi'' dSa Jz_i,
  // dz = phi' da + phi'' sum_i dJa_i Jz_i + dSa (phi'' Sz + phi''' sum_i Jz_i^2) (sq: the sum).
  void sum_channels(T* G, const T* Z, const T* __restrict__ d1, const T* __restrict__ d2, const T* __restrict__ d3,
                    T* __restrict__ dot, T* __restrict__ sq, int64_t n, int64_t len) const {
    T* __restrict__ gS = G + (1 + k) * n;
    for (int64_t m = 0; m < len; ++m) dot[m] = T(0), sq[m] = T(0);
    for (int64_t i = 0; i < k; ++i) {
      T* __restrict__ gJ = G + (1 + i) * n;
      const T* __restrict__ J = Z + (1 + i) * n;
      for (int64_t m = 0; m < len; ++m) {
        const T j = J[m], g = gJ[m];
        dot[m] += g * j;
        sq[m] += j * j;
        gJ[m] = d1[m] * g + T(2) * d2[m] * gS[m] * j;
      }
    }
    T* __restrict__ g0 = G;
    const T* __restrict__ S = Z + (1 + k) * n;
    for (int64_t m = 0; m < len; ++m) {
      g0[m] = d1[m] * g0[m] + d2[m] * dot[m] + gS[m] * (d2[m] * S[m] + d3[m] * sq[m]);
      gS[m] *= d1[m];
    }
  }

  // One channel S_p per pair p = (i, j): dJz_i = phi' dJa_i + phi'' sum over the pairs holding i of
  // dSa_p Jz_(the other index) (twice Jz_i where p = (i, i)), dSz_p = phi' dSa_p,
  // dz = phi' da + phi'' sum_i dJa_i Jz_i + sum_p dSa_p (phi'' Sz_p + phi''' Jz_i Jz_j) (extra: the last sum).
  void pair_channels(T* G, const T* Z, const T* __restrict__ d1, const T* __restrict__ d2, const T* __restrict__ d3,
                     T* __restrict__ dot, T* __restrict__ extra, int64_t n, int64_t len) const {
    for (int64_t m = 0; m < len; ++m) dot[m] = T(0), extra[m] = T(0);
    for (int64_t i = 0; i < k; ++i) {
      T* __restrict__ gJ = G + (1 + i) * n;
      const T* __restrict__ J = Z + (1 + i) * n;
      for (int64_t m = 0; m < len; ++m) {
        dot[m] += gJ[m] * J[m];
        gJ[m] *= d1[m];
      }
    }
    for (size_t p = 0; p < pairs.size(); ++p) {
      const int64_t c = 1 + k + static_cast<int64_t>(p);
      T* __restrict__ gS = G + c * n;
      const T* __restrict__ S = Z + c * n;
      const T *Ji = Z + (1 + pairs[p].first) * n, *Jj = Z + (1 + pairs[p].second) * n;
      T *gJi = G + (1 + pairs[p].first) * n, *gJj = G + (1 + pairs[p].second) * n;  // the same where i = j
      for (int64_t m = 0; m < len; ++m) {
        const T t = gS[m], ji = Ji[m], jj = Jj[m];
        gJi[m] += d2[m] * t * jj;
        gJj[m] += d2[m] * t * ji;
        extra[m] += t * (d2[m] * S[m] + d3[m] * ji * jj);
        gS[m] = d1[m] * t;
      }
    }
    T* __restrict__ g0 = G;
    for (int64_t m = 0; m < len; ++m) g0[m] = d1[m] * g0[m] + d2[m] * dot[m] + extra[m];
  }
};

// The Laplacian's activation step for K directions at once, in the layout [k + 2, M, K, O] of
// jets.h's output_jet_tangent and output_jet_vjp, over samples [lo, hi) of D (in place), given the jet
// before (Z) and after (A) the activation, [k + 2, M, O]. Per sample: phi', phi'', phi''' and
// sum_i Jz_i^2 of its row (shared by its K directions), then each direction's channels, in loops
// compiled for this CPU's vectors. Reverse false: D holds tangents of the jet before the activation
// and becomes theirs after it (CpuElementwise::jet_activation_tangent); true: D holds gradients in the
// jet after it and becomes those in the jet before it, per direction the formulas of
// JetReverse::sum_channels (CpuElementwise::jet_activation_backward_batched).
template <typename T, bool Reverse>
struct JetDirections {
  T* D;
  const T *Z, *A;
  Act kind;
  double p0, p1;
  int64_t M, K, O, k;

  void run(int64_t lo, int64_t hi) const {
    std::vector<T> buffer(5 * O);
    T *d1 = buffer.data(), *d2 = d1 + O, *d3 = d2 + O, *sq = d3 + O, *dot = sq + O;
    const int64_t n = M * O, nd = M * K * O;
    for (int64_t m = lo; m < hi; ++m) {
      const T* Zm = Z + m * O;
      jet_derivatives(kind, p0, p1, Zm, A + m * O, d1, d2, d3, O);
      run_simd([&] {
        for (int64_t o = 0; o < O; ++o) sq[o] = T(0);
        for (int64_t i = 0; i < k; ++i) {
          const T* __restrict__ J = Zm + (1 + i) * n;
          for (int64_t o = 0; o < O; ++o) sq[o] += J[o] * J[o];
        }
        for (int64_t kk = 0; kk < K; ++kk) {
          if constexpr (Reverse) {
            reverse(D + (m * K + kk) * O, Zm, d1, d2, d3, sq, dot, n, nd);
          } else {
            tangent(D + (m * K + kk) * O, Zm, d1, d2, d3, sq, n, nd);
          }
        }
      });
    }
  }

  // ȧ = phi' ż, J̇a_i = phi'' ż Jz_i + phi' J̇z_i, Ṡa = phi'' ż Sz + phi' Ṡz + phi''' ż sum_i Jz_i^2 + 2 phi'' sum_i Jz_i
  // J̇z_i
  void tangent(T* D0, const T* Zm, const T* __restrict__ d1, const T* __restrict__ d2, const T* __restrict__ d3,
               const T* __restrict__ sq, int64_t n, int64_t nd) const {
    T* __restrict__ z0 = D0;
    T* __restrict__ S = D0 + (1 + k) * nd;
    const T* __restrict__ Sz = Zm + (1 + k) * n;
    for (int64_t o = 0; o < O; ++o) S[o] = d2[o] * z0[o] * Sz[o] + d1[o] * S[o] + d3[o] * z0[o] * sq[o];
    for (int64_t i = 0; i < k; ++i) {
      T* __restrict__ J = D0 + (1 + i) * nd;
      const T* __restrict__ Jz = Zm + (1 + i) * n;
      for (int64_t o = 0; o < O; ++o) {
        S[o] += T(2) * d2[o] * Jz[o] * J[o];
        J[o] = d2[o] * z0[o] * Jz[o] + d1[o] * J[o];
      }
    }
    for (int64_t o = 0; o < O; ++o) z0[o] *= d1[o];
  }

  void reverse(T* G0, const T* Zm, const T* __restrict__ d1, const T* __restrict__ d2, const T* __restrict__ d3,
               const T* __restrict__ sq, T* __restrict__ dot, int64_t n, int64_t nd) const {
    T* __restrict__ gS = G0 + (1 + k) * nd;
    for (int64_t o = 0; o < O; ++o) dot[o] = T(0);
    for (int64_t i = 0; i < k; ++i) {
      T* __restrict__ gJ = G0 + (1 + i) * nd;
      const T* __restrict__ J = Zm + (1 + i) * n;
      for (int64_t o = 0; o < O; ++o) {
        dot[o] += gJ[o] * J[o];
        gJ[o] = d1[o] * gJ[o] + T(2) * d2[o] * gS[o] * J[o];
      }
    }
    T* __restrict__ g0 = G0;
    const T* __restrict__ S = Zm + (1 + k) * n;
    for (int64_t o = 0; o < O; ++o) {
      g0[o] = d1[o] * g0[o] + d2[o] * dot[o] + gS[o] * (d2[o] * S[o] + d3[o] * sq[o]);
      gS[o] *= d1[o];
    }
  }
};

struct CpuElementwise {
  // The factor that the forward pass's product applies to z for activation(), a power of 2 (exact):
  // tanh takes 2 z.
  static double input_scale(Act kind) { return kind == Act::Tanh ? 2.0 : 1.0; }

  // z (scaled by input_scale(kind)) -> a = phi(z) in place; d = phi'(z), d2 = phi''(z) (d2 undefined:
  // not stored), in one pass (act_rows).
  static void activation(at::Tensor& z, Act kind, double p0, double p1, at::Tensor& d, at::Tensor& d2) {
    const int64_t n = z.numel();
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "activation_cpu", [&] {
      scalar_t* pz = z.data_ptr<scalar_t>();
      scalar_t* pd = d.data_ptr<scalar_t>();
      scalar_t* pd2 = d2.defined() ? d2.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, n, 8192, [&](int64_t lo, int64_t hi) {
        act_rows<scalar_t>(kind, p0, p1, pz + lo, pd + lo, pd2 ? pd2 + lo : nullptr, hi - lo);
      });
    });
  }

  // The loss rows (losses.h) of the output z [M, C] against y [M, C]: g, h [M, C], w [M].
  static void loss_rows(Loss kind, double param, double scale, const at::Tensor& z, const at::Tensor& y, at::Tensor& g,
                        at::Tensor& h, at::Tensor& w) {
    const int64_t M = z.size(0), C = z.size(1);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "loss_rows_cpu", [&] {
      const scalar_t *pz = z.data_ptr<scalar_t>(), *py = y.data_ptr<scalar_t>();
      scalar_t *pg = g.data_ptr<scalar_t>(), *ph = h.data_ptr<scalar_t>(), *pw = w.data_ptr<scalar_t>();
      at::parallel_for(0, M, std::max<int64_t>(1, 4096 / C), [&](int64_t lo, int64_t hi) {
        for (int64_t m = lo; m < hi; ++m)
          loss_row<scalar_t>(kind, static_cast<scalar_t>(param), static_cast<scalar_t>(scale), static_cast<int>(C),
                             pz + m * C, py + m * C, pg + m * C, ph + m * C, pw + m);
      });
    });
  }

  // The R-forward step on contiguous rows: po = pd * (r + pb), r and po [M, K, w] (po may be r), pd
  // [M, w] broadcast over k, pb [K, w] (the vectors' bias components) or null. r itself is left
  // without pb where po is another buffer (r_residual_rows adds it back): one stream written, not two.
  template <typename T>
  static void r_scale_rows(T* po, const T* r, const T* pd, const T* pb, int64_t M, int64_t K, int64_t w) {
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / (K * w)), [&](int64_t lo, int64_t hi) {
      run_simd([&] {
        for (int64_t m = lo; m < hi; ++m)
          for (int64_t k = 0; k < K; ++k) {
            const T* rrow = r + (m * K + k) * w;
            T* orow = po + (m * K + k) * w;
            const T* __restrict__ drow = pd + m * w;
            if (!pb) {
              for (int64_t j = 0; j < w; ++j) orow[j] = drow[j] * rrow[j];
            } else {
              const T* __restrict__ brow = pb + k * w;
              for (int64_t j = 0; j < w; ++j) orow[j] = drow[j] * (rrow[j] + brow[j]);
            }
          }
      });
    });
  }

  // The R-backward step on contiguous rows: Re -> Rdelta = d * Re + (d2 * e) * (Rz + pb) in place (d2 e,
  // the residual coefficient), r = Re and prz = Rz [M, K, w] (without the bias components pb [K, w],
  // or null, that r_scale_rows added on the way), pd, pd2, pe [M, w] broadcast over k.
  template <typename T>
  static void r_residual_rows(T* r, const T* pd, const T* pd2, const T* pe, const T* prz, const T* pb, int64_t M,
                              int64_t K, int64_t w) {
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / (K * w)), [&](int64_t lo, int64_t hi) {
      run_simd([&] {
        for (int64_t m = lo; m < hi; ++m)
          for (int64_t k = 0; k < K; ++k) {
            T* __restrict__ row = r + (m * K + k) * w;
            const T* __restrict__ rzrow = prz + (m * K + k) * w;
            const T* __restrict__ drow = pd + m * w, * __restrict__ d2row = pd2 + m * w, * __restrict__ erow = pe + m * w;
            if (!pb) {
              for (int64_t j = 0; j < w; ++j) row[j] = drow[j] * row[j] + d2row[j] * erow[j] * rzrow[j];
            } else {
              const T* __restrict__ brow = pb + k * w;
              for (int64_t j = 0; j < w; ++j) row[j] = drow[j] * row[j] + d2row[j] * erow[j] * (rzrow[j] + brow[j]);
            }
          }
      });
    });
  }

  // F [i, M, Q] -> d * F in place (d [M, i], undefined: identity), and dG[m, i] += sum_q sigma[m, q] F^2
  // (sigma [M, Q], undefined: all +1).
  static void scale_square_sum(at::Tensor& F, const at::Tensor& d, const at::Tensor& sigma, at::Tensor& dG) {
    const int64_t I = F.size(0), M = F.size(1), Q = F.size(2);
    AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "scale_square_sum_cpu", [&] {
      scalar_t* pf = F.data_ptr<scalar_t>();
      scalar_t* pg = dG.data_ptr<scalar_t>();
      const scalar_t* pd = d.defined() ? d.data_ptr<scalar_t>() : nullptr;
      const scalar_t* ps = sigma.defined() ? sigma.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, I, std::max<int64_t>(1, 16384 / (M * Q)), [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i)
          for (int64_t m = 0; m < M; ++m) {
            scalar_t* row = pf + (i * M + m) * Q;
            const scalar_t dd = pd ? pd[m * I + i] : scalar_t(1);
            scalar_t acc = 0;
            if (ps) {
              const scalar_t* srow = ps + m * Q;
              for (int64_t q = 0; q < Q; ++q) {
                row[q] *= dd;
                acc += srow[q] * row[q] * row[q];
              }
            } else {
              for (int64_t q = 0; q < Q; ++q) {
                row[q] *= dd;
                acc += row[q] * row[q];
              }
            }
            pg[m * I + i] += acc;
          }
      });
    });
  }

  // The factor columns of D W^T diag(R) W D: F[i, m, o] = d[m, i] W[o, i] sqrt|R[m, o]|, [I, M, O].
  static at::Tensor residual_factor(const at::Tensor& W, const at::Tensor& R, const at::Tensor& d) {
    const int64_t O = W.size(0), I = W.size(1), M = R.size(0);
    at::Tensor F = at::empty({I, M, O}, R.options());
    const at::Tensor root = R.abs().sqrt();
    AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "residual_factor_cpu", [&] {
      scalar_t* pf = F.data_ptr<scalar_t>();
      const scalar_t *pw = W.data_ptr<scalar_t>(), *pr = root.data_ptr<scalar_t>();
      const scalar_t* pd = d.defined() ? d.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, I, std::max<int64_t>(1, 16384 / (M * O)), [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i)
          for (int64_t m = 0; m < M; ++m) {
            const scalar_t dd = pd ? pd[m * I + i] : scalar_t(1);
            scalar_t* row = pf + (i * M + m) * O;
            const scalar_t* rrow = pr + m * O;
            for (int64_t o = 0; o < O; ++o) row[o] = dd * pw[o * I + i] * rrow[o];
          }
      });
    });
    return F;
  }

  // One activation step of the input jets (jets.h) in place on z [1 + d + q, M, o], bias [o] (or
  // undefined) joining the value channel: the value channel becomes the values, with phi' and phi''
  // beside it, then the second-order channels (they need Jz) and J, tile by tile in one pass (JetStep).
  // sum_channel: one channel, S = phi' S + phi'' sum_i Jz[i]^2.
  static void jet_activation(const at::Tensor& z, const at::Tensor& bias, Act kind, double p0, double p1, int64_t d,
                             bool sum_channel, const std::vector<std::pair<int64_t, int64_t>>& pairs) {
    const int64_t M = z.size(1), O = z.size(2);
    at::Tensor first = at::empty({M, O}, z.options()), second = at::empty({M, O}, z.options());
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "jet_activation_cpu", [&] {
      const JetStep<scalar_t> step{z.data_ptr<scalar_t>(),
                                   first.data_ptr<scalar_t>(),
                                   second.data_ptr<scalar_t>(),
                                   bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                                   static_cast<scalar_t>(input_scale(kind)),
                                   kind,
                                   p0,
                                   p1,
                                   M,
                                   O,
                                   d,
                                   sum_channel,
                                   pairs};
      at::parallel_for(0, M, std::max<int64_t>(1, 8192 / O), [&](int64_t lo, int64_t hi) { step.run(lo, hi); });
    });
  }
  // The reverse of jet_activation (jets.h, output_jet_backward), in place: G [1 + k + q, M, O] holds the
  // gradient in the jet after the activation and becomes the gradient in the jet before it; Z is that
  // jet before (value with bias, k first-order channels, the Laplacian's sum channel or one channel per
  // pair), A after (its value channel holds phi(z), from which tanh and sigmoid take their derivatives).
  // Tile by tile of samples: phi', phi'', phi''' of the tile, then the channels in loops compiled for
  // this CPU's vectors (JetReverse).
  static void jet_activation_backward(const at::Tensor& G, const at::Tensor& Z, const at::Tensor& A, Act kind,
                                      double p0, double p1, int64_t k, bool sum_channel,
                                      const std::vector<std::pair<int64_t, int64_t>>& pairs) {
    const int64_t M = G.size(1), O = G.size(2);
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "jet_activation_backward_cpu", [&] {
      const JetReverse<scalar_t> step{G.data_ptr<scalar_t>(),
                                      Z.data_ptr<scalar_t>(),
                                      A.data_ptr<scalar_t>(),
                                      kind,
                                      p0,
                                      p1,
                                      M,
                                      O,
                                      k,
                                      sum_channel,
                                      pairs};
      at::parallel_for(0, M, std::max<int64_t>(1, 8192 / O), [&](int64_t lo, int64_t hi) { step.run(lo, hi); });
    });
  }
  // jet_activation_backward for K gradients at once in the layout [k + 2, M, K, O] (jets.h, output_jet_vjp),
  // the Laplacian's sum channel (JetDirections, reverse).
  static void jet_activation_backward_batched(const at::Tensor& G, const at::Tensor& Z, const at::Tensor& A, Act kind,
                                              double p0, double p1, int64_t k) {
    directions<true>(G, Z, A, kind, p0, p1, k);
  }
  // The tangent of jet_activation with the Laplacian's sum channel (jets.h, output_jet_tangent), in place:
  // D [k + 2, M, K, O] holds K directions' tangents of the jet before the activation and becomes theirs
  // after it; Z, A [k + 2, M, O] the jet before and after (JetDirections, forward).
  static void jet_activation_tangent(const at::Tensor& D, const at::Tensor& Z, const at::Tensor& A, Act kind, double p0,
                                     double p1, int64_t k) {
    directions<false>(D, Z, A, kind, p0, p1, k);
  }
  template <bool Reverse>
  static void directions(const at::Tensor& D, const at::Tensor& Z, const at::Tensor& A, Act kind, double p0, double p1,
                         int64_t k) {
    const int64_t M = D.size(1), K = D.size(2), O = D.size(3);
    AT_DISPATCH_FLOATING_TYPES(D.scalar_type(), "jet_activation_directions_cpu", [&] {
      const JetDirections<scalar_t, Reverse> step{
          D.data_ptr<scalar_t>(), Z.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), kind, p0, p1, M, K, O, k};
      at::parallel_for(0, M, std::max<int64_t>(1, 8192 / (K * O)), [&](int64_t lo, int64_t hi) { step.run(lo, hi); });
    });
  }
};

// The batched forward pass's rows as raw pointers, read once per call (not per sample): a, d (null
// where the identity produced a) and d2 (null where the activation is piecewise linear) per layer.
template <typename T>
struct ForwardRows {
  const T* a[fused::kMaxLayers + 1];
  const T* d[fused::kMaxLayers + 1];
  const T* d2[fused::kMaxLayers + 1];
  ForwardRows(const fused::Net<T>& net, const Forward& f) {
    for (int l = 0; l <= net.L; ++l) {
      a[l] = f.a[l].data_ptr<T>();
      d[l] = f.d[l].defined() ? f.d[l].data_ptr<T>() : nullptr;
      d2[l] = f.d2[l].defined() ? f.d2[l].data_ptr<T>() : nullptr;
    }
  }
  // Sample m's rows into its fused scratch (d = 1 and d2 = 0 where they are not stored).
  void load(const fused::Net<T>& net, int64_t m, const fused::Sample<T>& smp) const {
    for (int l = 0; l <= net.L; ++l) {
      const int64_t n = net.n[l], u = net.off[l];
      std::copy_n(a[l] + m * n, n, smp.a + u);
      if (d[l]) {
        std::copy_n(d[l] + m * n, n, smp.d + u);
      } else {
        std::fill_n(smp.d + u, n, T(1));
      }
      if (d2[l]) {
        std::copy_n(d2[l] + m * n, n, smp.d2 + u);
      } else {
        std::fill_n(smp.d2 + u, n, T(0));
      }
    }
  }
  // Samples m .. m + count - 1 into lanes 0 .. count - 1 of a lanes scratch; the lanes past count zero.
  template <int W>
  void load_lanes(const fused::Net<T>& net, int64_t m, int count, const fused::Sample<Lanes<T, W>>& smp) const {
    for (int l = 0; l <= net.L; ++l) {
      const int64_t n = net.n[l], u = net.off[l];
      for (int64_t i = 0; i < n; ++i) {
        Lanes<T, W>&a_ = smp.a[u + i], &d_ = smp.d[u + i], &d2_ = smp.d2[u + i];
        for (int j = 0; j < W; ++j) {
          const bool in = j < count;
          const int64_t at = (m + j) * n + i;
          a_.v[j] = in ? a[l][at] : T(0);
          d_.v[j] = in ? (d[l] ? d[l][at] : T(1)) : T(0);
          d2_.v[j] = in && d2[l] ? d2[l][at] : T(0);
        }
      }
    }
  }
};

}  // namespace hessext
