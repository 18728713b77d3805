// Fused elementwise steps of the stack recurrences on the CPU, one pass each, parallel over rows m.
// Shapes: per-sample tensors [M, w]; R-quantities [M, K, w] (contiguous).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "stack.h"

namespace hessext {

struct CpuElementwise {
  // z -> a = tanh(z) in place (ATen's vectorised tanh); d = 1 - a^2.
  static void tanh_forward(at::Tensor& z, at::Tensor& d) {
    z.tanh_();
    const int64_t n = z.numel();
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "tanh_forward_cpu", [&] {
      const scalar_t* pa = z.data_ptr<scalar_t>();
      scalar_t* pd = d.data_ptr<scalar_t>();
      at::parallel_for(0, n, 16384, [&](int64_t lo, int64_t hi) {
        for (int64_t j = lo; j < hi; ++j) pd[j] = scalar_t(1) - pa[j] * pa[j];
      });
    });
  }

  // Rz -> Ra = d * Rz in place, d broadcast over k.
  static void r_forward_tanh(at::Tensor Rz, const at::Tensor& d) {
    const int64_t M = Rz.size(0), K = Rz.size(1), w = Rz.size(2);
    AT_DISPATCH_FLOATING_TYPES(Rz.scalar_type(), "r_forward_tanh_cpu", [&] {
      scalar_t* r = Rz.data_ptr<scalar_t>();
      const scalar_t* pd = d.data_ptr<scalar_t>();
      at::parallel_for(0, M, std::max<int64_t>(1, 4096 / (K * w)), [&](int64_t lo, int64_t hi) {
        for (int64_t m = lo; m < hi; ++m)
          for (int64_t k = 0; k < K; ++k) {
            scalar_t* row = r + (m * K + k) * w;
            for (int64_t j = 0; j < w; ++j) row[j] *= pd[m * w + j];
          }
      });
    });
  }

  // Re -> Rdelta = d * Re - 2 a e Ra in place (the tanh residual term), d, a, e broadcast over k.
  static void r_backward_tanh(at::Tensor Re, const at::Tensor& d, const at::Tensor& a, const at::Tensor& e,
                              const at::Tensor& Ra) {
    const int64_t M = Re.size(0), K = Re.size(1), w = Re.size(2);
    AT_DISPATCH_FLOATING_TYPES(Re.scalar_type(), "r_backward_tanh_cpu", [&] {
      scalar_t* r = Re.data_ptr<scalar_t>();
      const scalar_t *pd = d.data_ptr<scalar_t>(), *pa = a.data_ptr<scalar_t>(), *pe = e.data_ptr<scalar_t>(),
                     *pra = Ra.data_ptr<scalar_t>();
      at::parallel_for(0, M, std::max<int64_t>(1, 4096 / (K * w)), [&](int64_t lo, int64_t hi) {
        for (int64_t m = lo; m < hi; ++m)
          for (int64_t k = 0; k < K; ++k) {
            scalar_t* row = r + (m * K + k) * w;
            const scalar_t* rarow = pra + (m * K + k) * w;
            for (int64_t j = 0; j < w; ++j) {
              const int64_t mj = m * w + j;
              row[j] = pd[mj] * row[j] - scalar_t(2) * pa[mj] * pe[mj] * rarow[j];
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

  // One tanh step of the input jets (jets.h) in place on z [o, M, 1 + d + q]: second-order channels
  // first (they need Jz), then J, then the value. sum_channel: one channel, sum_i Jz[i]^2.
  static void jet_tanh(at::Tensor& z, int64_t d, bool sum_channel, const std::vector<std::pair<int64_t, int64_t>>& pairs) {
    const int64_t rows = z.size(0) * z.size(1), cols = z.size(2);
    const at::Tensor a = z.select(2, 0).tanh();  // ATen's vectorised tanh, [o, M]
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "jet_tanh_cpu", [&] {
      scalar_t* pz = z.data_ptr<scalar_t>();
      const scalar_t* pa = a.data_ptr<scalar_t>();
      at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / cols), [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          scalar_t* row = pz + r * cols;
          const scalar_t av = pa[r], dd = scalar_t(1) - av * av, p2 = scalar_t(-2) * av * dd;
          scalar_t* J = row + 1;
          scalar_t* S = row + 1 + d;
          if (sum_channel) {
            scalar_t acc = 0;
            for (int64_t i = 0; i < d; ++i) acc += J[i] * J[i];
            S[0] = dd * S[0] + p2 * acc;
          } else {
            for (size_t k = 0; k < pairs.size(); ++k) S[k] = dd * S[k] + p2 * J[pairs[k].first] * J[pairs[k].second];
          }
          for (int64_t i = 0; i < d; ++i) J[i] *= dd;
          row[0] = av;
        }
      });
    });
  }
};

}  // namespace hessext
