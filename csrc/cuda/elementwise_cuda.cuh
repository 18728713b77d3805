// Fused elementwise steps of the stack recurrences on the GPU: the same steps as
// cpu/elementwise_cpu.h, one kernel launch each on the current stream, one thread per element or row.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "stack.h"

namespace hessext {
namespace cuda_detail {

constexpr int kThreads = 256;
inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 16));
}

#define HX_GRID_LOOP(j, n) \
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < (n); j += int64_t(gridDim.x) * blockDim.x)

// z -> phi(z) in place; d = phi'(z), d2 = phi''(z) (d2 nullptr: not stored)
template <typename T>
__global__ void activation_kernel(T* z, T* d, T* d2, int64_t n, Act kind, T p0, T p1) {
  HX_GRID_LOOP(j, n) {
    T second = T(0);
    act_eval(kind, p0, p1, z[j], z[j], d[j], second);
    if (d2) d2[j] = second;
  }
}

// One loss row (losses.h) per thread: z, y, g, h [M, C], w [M]
template <typename T>
__global__ void loss_rows_kernel(Loss kind, T param, T scale, int C, const T* z, const T* y, T* g, T* h, T* w,
                                 int64_t M) {
  HX_GRID_LOOP(m, M) { loss_row(kind, param, scale, C, z + m * C, y + m * C, g + m * C, h + m * C, w + m); }
}

// out [M, K, w] = d [M, w] * r [M, K, w] (out may be r); with vb [K, w] (contiguous), r += vb first (kept
// in r where out is another tensor)
template <typename T>
__global__ void r_scale_kernel(T* out, T* r, const T* d, const T* vb, int64_t M, int64_t K, int64_t w) {
  HX_GRID_LOOP(j, M * K * w) {
    const int64_t m = j / (K * w), c = j % w;
    const T t = vb ? r[j] + vb[j % (K * w)] : r[j];
    if (vb && out != r) r[j] = t;
    out[j] = d[m * w + c] * t;
  }
}

// r [M, K, w] <- d r + (d2 e) Rz
template <typename T>
__global__ void r_residual_kernel(T* r, const T* d, const T* d2, const T* e, const T* Rz, int64_t M, int64_t K,
                                  int64_t w) {
  HX_GRID_LOOP(j, M * K * w) {
    const int64_t mc = (j / (K * w)) * w + j % w;
    r[j] = d[mc] * r[j] + d2[mc] * e[mc] * Rz[j];
  }
}

// F [I, M, Q] *= d[m, i]; dG[m, i] += sum_q sigma F^2 (one thread per (i, m) row)
template <typename T>
__global__ void scale_square_sum_kernel(T* F, const T* d, const T* sigma, T* dG, int64_t I, int64_t M, int64_t Q) {
  HX_GRID_LOOP(row, I * M) {
    const int64_t i = row / M, m = row % M;
    T* f = F + row * Q;
    const T dd = d ? d[m * I + i] : T(1);
    T acc = 0;
    for (int64_t q = 0; q < Q; ++q) {
      f[q] *= dd;
      acc += (sigma ? sigma[m * Q + q] : T(1)) * f[q] * f[q];
    }
    dG[m * I + i] += acc;
  }
}

// F[i, m, o] = d[m, i] W[o, i] root[m, o]
template <typename T>
__global__ void residual_factor_kernel(T* F, const T* W, const T* root, const T* d, int64_t I, int64_t M, int64_t O) {
  HX_GRID_LOOP(j, I * M * O) {
    const int64_t i = j / (M * O), m = (j / O) % M, o = j % O;
    F[j] = (d ? d[m * I + i] : T(1)) * W[o * I + i] * root[m * O + o];
  }
}

// One activation step of the input jets on z [1 + d + q, M, O] (see jets.h), one thread per sample and
// unit (channels at stride n = M O, so neighbouring threads read neighbouring units), bias [O] or null;
// mode: 0 sum channel, 1 diagonal channels (i, i), 2 full channels (i <= j, row-major).
template <typename T>
__global__ void jet_activation_kernel(T* z, const T* bias, int64_t O, int64_t M, int64_t d, int mode, Act kind, T p0,
                                      T p1) {
  const int64_t n = M * O;
  HX_GRID_LOOP(r, n) {
    T* unit = z + r;
    T av, dd, p2;
    act_eval(kind, p0, p1, unit[0] + (bias ? bias[r % O] : T(0)), av, dd, p2);
    T* J = unit + n;
    T* S = unit + (1 + d) * n;
    if (mode == 0) {
      T acc = 0;
      for (int64_t i = 0; i < d; ++i) acc += J[i * n] * J[i * n];
      S[0] = dd * S[0] + p2 * acc;
    } else if (mode == 1) {
      for (int64_t i = 0; i < d; ++i) S[i * n] = dd * S[i * n] + p2 * J[i * n] * J[i * n];
    } else {
      int64_t k = 0;
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = i; j < d; ++j, ++k) S[k * n] = dd * S[k * n] + p2 * J[i * n] * J[j * n];
    }
    for (int64_t i = 0; i < d; ++i) J[i * n] *= dd;
    unit[0] = av;
  }
}

}  // namespace cuda_detail

struct CudaElementwise {
  // The factor that the forward pass's product applies to z for activation(): none here.
  static double input_scale(Act) { return 1.0; }

  static void activation(at::Tensor& z, Act kind, double p0, double p1, at::Tensor& d, at::Tensor& d2) {
    const int64_t n = z.numel();
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "activation_cuda", [&] {
      cuda_detail::activation_kernel<scalar_t>
          <<<cuda_detail::blocks_for(n), cuda_detail::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              z.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), d2.defined() ? d2.data_ptr<scalar_t>() : nullptr, n, kind,
              static_cast<scalar_t>(p0), static_cast<scalar_t>(p1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void loss_rows(Loss kind, double param, double scale, const at::Tensor& z, const at::Tensor& y, at::Tensor& g,
                        at::Tensor& h, at::Tensor& w) {
    const int64_t M = z.size(0), C = z.size(1);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "loss_rows_cuda", [&] {
      cuda_detail::loss_rows_kernel<scalar_t>
          <<<cuda_detail::blocks_for(M), cuda_detail::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              kind, static_cast<scalar_t>(param), static_cast<scalar_t>(scale), static_cast<int>(C),
              z.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
              w.data_ptr<scalar_t>(), M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void r_scale(const at::Tensor& out, const at::Tensor& R, const at::Tensor& d, const at::Tensor& vb = {}) {
    const int64_t M = R.size(0), K = R.size(1), w = R.size(2);
    AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "r_scale_cuda", [&] {
      cuda_detail::r_scale_kernel<scalar_t>
          <<<cuda_detail::blocks_for(M * K * w), cuda_detail::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              out.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(),
              vb.defined() ? vb.data_ptr<scalar_t>() : nullptr, M, K, w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void r_residual(at::Tensor Re, const at::Tensor& d, const at::Tensor& d2, const at::Tensor& e,
                         const at::Tensor& Rz) {
    const int64_t M = Re.size(0), K = Re.size(1), w = Re.size(2);
    AT_DISPATCH_FLOATING_TYPES(Re.scalar_type(), "r_residual_cuda", [&] {
      cuda_detail::r_residual_kernel<scalar_t>
          <<<cuda_detail::blocks_for(M * K * w), cuda_detail::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              Re.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), d2.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(),
              Rz.data_ptr<scalar_t>(), M, K, w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void scale_square_sum(at::Tensor& F, const at::Tensor& d, const at::Tensor& sigma, at::Tensor& dG) {
    const int64_t I = F.size(0), M = F.size(1), Q = F.size(2);
    AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "scale_square_sum_cuda", [&] {
      cuda_detail::scale_square_sum_kernel<scalar_t>
          <<<cuda_detail::blocks_for(I * M), cuda_detail::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              F.data_ptr<scalar_t>(), d.defined() ? d.data_ptr<scalar_t>() : nullptr,
              sigma.defined() ? sigma.data_ptr<scalar_t>() : nullptr, dG.data_ptr<scalar_t>(), I, M, Q);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static at::Tensor residual_factor(const at::Tensor& W, const at::Tensor& R, const at::Tensor& d) {
    const int64_t O = W.size(0), I = W.size(1), M = R.size(0);
    at::Tensor F = at::empty({I, M, O}, R.options());
    const at::Tensor root = R.abs().sqrt();
    AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "residual_factor_cuda", [&] {
      cuda_detail::residual_factor_kernel<scalar_t>
          <<<cuda_detail::blocks_for(I * M * O), cuda_detail::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              F.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), root.data_ptr<scalar_t>(),
              d.defined() ? d.data_ptr<scalar_t>() : nullptr, I, M, O);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return F;
  }

  static void jet_activation(const at::Tensor& z, const at::Tensor& bias, Act kind, double p0, double p1, int64_t d,
                             bool sum_channel, const std::vector<std::pair<int64_t, int64_t>>& pairs) {
    const int64_t M = z.size(1), O = z.size(2);
    const int mode = sum_channel ? 0 : (static_cast<int64_t>(pairs.size()) == d ? 1 : 2);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "jet_activation_cuda", [&] {
      cuda_detail::jet_activation_kernel<scalar_t>
          <<<cuda_detail::blocks_for(O * M), cuda_detail::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              z.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, O, M, d, mode, kind,
              static_cast<scalar_t>(p0), static_cast<scalar_t>(p1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace hessext
