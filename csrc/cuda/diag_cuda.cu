// CUDA kernel of hessext::diag. Narrow stacks with little work: one launch, one thread per sample
// running fused::diag_sample (its whole pre-activation Hessian in per-thread scratch) into its own
// row of a [M, P] buffer (per_sample: the result; else summed over samples). Otherwise the factored
// GEMM recurrence of diag.h with the fused elementwise kernels.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/elementwise_cuda.cuh"
#include "diag.h"

namespace hessext {
namespace {

constexpr int64_t kMaxScratchElems = int64_t(1) << 25;

template <typename T>
struct SlotOffsets {
  int64_t offW[fused::kMaxLayers], offb[fused::kMaxLayers];
};

template <typename T>
__global__ void diag_fused_kernel(fused::Net<T> net, SlotOffsets<T> so, bool ggn, const T* x, const T* y, T* scratch,
                                  int64_t per_sample, T* out, int64_t M, int64_t P) {
  const int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (m >= M) return;
  const int W2 = net.maxw * net.maxw;
  const fused::Sample<T> smp(net, scratch + m * per_sample);
  T *G = smp.end(net), *Gn = G + W2, *Tm = Gn + W2;
  fused::forward(net, x + m * net.n[0], smp.a, smp.d, smp.d2);
  fused::loss(net, smp.a, y + m * net.n[net.L], smp.delta, smp.head);
  if (!ggn) fused::backward(net, smp.d, smp.delta, smp.e);
  T* HW[fused::kMaxLayers];
  T* Hb[fused::kMaxLayers];
  T* row = out + m * P;
  for (int l = 0; l < net.L; ++l) {
    HW[l] = row + so.offW[l];
    Hb[l] = so.offb[l] >= 0 ? row + so.offb[l] : nullptr;
  }
  fused::diag_sample(net, ggn, smp.a, smp.d, smp.d2, smp.e, smp.head, G, Gn, Tm, HW, Hb);
}

template <typename T>
std::vector<at::Tensor> diag_fused_cuda(const Stack& s, bool ggn, bool per_sample) {
  const fused::Net<T> net = make_net<T>(s);
  const SlotLayout layout(s);
  SlotOffsets<T> so{};
  for (int64_t l = 0; l < s.L; ++l) {
    so.offW[l] = layout.offset[s.slot_W[l]];
    so.offb[l] = s.slot_b[l] >= 0 ? layout.offset[s.slot_b[l]] : -1;
  }
  const int64_t M = s.M, P = layout.total, per = fused::Sample<T>::size(net) + 3 * int64_t(net.maxw) * net.maxw;
  at::Tensor scratch = at::empty({M * per}, s.x.options());
  at::Tensor out = at::zeros({M, P}, s.x.options());
  constexpr int threads = 128;
  diag_fused_kernel<T><<<static_cast<int>((M + threads - 1) / threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      net, so, ggn, s.x.data_ptr<T>(), s.y.data_ptr<T>(), scratch.data_ptr<T>(), per, out.data_ptr<T>(), M, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor total = per_sample ? out : out.sum(0);
  return layout.split_rows(total, s, per_sample ? std::vector<int64_t>{M} : std::vector<int64_t>{});
}

std::vector<at::Tensor> diag_cuda(HX_STACK_PARAMS, bool ggn, bool per_sample) {
  const c10::cuda::CUDAGuard guard(inputs.device());
  const Stack s(HX_STACK_ARGS);
  const int64_t w = s.max_width();
  int64_t units = 0;
  for (int64_t l = 0; l <= s.L; ++l) units += s.width(l);
  if (!PathChoice::fused_diag(s) || s.M * (5 * units + s.width(s.L) + 1 + 3 * w * w) > kMaxScratchElems)
    return diag<CudaElementwise>(s, ggn, per_sample);
  return AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "diag_fused_cuda",
                                    [&] { return diag_fused_cuda<scalar_t>(s, ggn, per_sample); });
}

}  // namespace

TORCH_LIBRARY_IMPL(hessext, CUDA, m) { m.impl("diag", &diag_cuda); }

}  // namespace hessext
