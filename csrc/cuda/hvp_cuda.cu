// CUDA kernels of hessext::hvp and hessext::ggn_vp. Narrow stacks: one launch, one thread per
// sample running the whole per-sample recurrence of fused.h (forward, backward, R-forward,
// R-backward for all K vectors) into its own row of a [M, P * K] buffer, summed over samples
// afterwards (deterministic, no atomics). Wide stacks: the GEMM recurrence of hvp.h (cuBLAS through
// ATen, the K vectors batched into single products) with the fused elementwise kernels.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/elementwise_cuda.cuh"
#include "hvp.h"

namespace hessext {
namespace {

template <typename T, bool GGN>
__global__ void hvp_fused_kernel(fused::Net<T> net, fused::LayerVectors<T> vp, int K, const T* x, const T* y,
                                 T* scratch, int64_t per_sample, T* out, int64_t M, int64_t PK) {
  const int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (m >= M) return;
  const int U = net.off[net.L + 1];
  const fused::Sample<T> smp(net, scratch + m * per_sample);
  T *Rz = smp.end(net), *r0 = Rz + U * K, *r1 = r0 + net.maxw * K;
  fused::forward(net, x + m * net.n[0], smp.a, smp.d, smp.d2);
  fused::loss(net, smp.a, y + m * net.n[net.L], smp.delta, smp.head);
  if (!GGN) fused::backward(net, smp.d, smp.delta, smp.e);
  T* HW[fused::kMaxLayers];
  T* Hb[fused::kMaxLayers];
  vp.targets(net.L, K, out + m * PK, HW, Hb);
  fused::hvp_sample<T, 0, GGN>(net, K, smp.a, smp.d, smp.d2, smp.delta, smp.e, smp.head, vp.V, vp.vb, Rz, r0, r1, HW,
                               Hb);
}

template <typename T, bool GGN>
std::vector<at::Tensor> hvp_fused_cuda(const Stack& s, at::TensorList vectors, const std::vector<int64_t>& lead) {
  const int64_t K = num_vectors(lead);
  const fused::Net<T> net = make_net<T>(s);
  const SlotLayout layout(s);
  std::vector<at::Tensor> vt;  // each vector slot as [numel, K]
  for (const auto& v : vectors) vt.push_back(v.reshape({K, -1}).t().contiguous());
  const fused::LayerVectors<T> vp = layer_vectors<T>(s, layout, vt);
  const int64_t M = s.M, U = net.off[net.L + 1], per = fused::Sample<T>::size(net) + (U + 2 * net.maxw) * K,
                PK = layout.total * K;
  at::Tensor scratch = at::empty({M * per}, s.x.options());
  at::Tensor out = at::zeros({M, PK}, s.x.options());
  constexpr int threads = 128;
  hvp_fused_kernel<T, GGN>
      <<<static_cast<int>((M + threads - 1) / threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
          net, vp, static_cast<int>(K), s.x.data_ptr<T>(), s.y.data_ptr<T>(), scratch.data_ptr<T>(), per,
          out.data_ptr<T>(), M, PK);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return layout.unpack(out.sum(0), s, lead);
}

template <bool GGN>
std::vector<at::Tensor> products_cuda(HX_STACK_PARAMS, at::TensorList vectors) {
  const c10::cuda::CUDAGuard guard(inputs.device());
  const Stack s(HX_STACK_ARGS);
  const std::vector<int64_t> lead = s.check_vectors(vectors);
  const int64_t K = num_vectors(lead);
  if (!PathChoice::fused(s, K)) return hvp<CudaElementwise>(s, vectors, lead, GGN);
  return AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "hvp_fused_cuda",
                                    [&] { return hvp_fused_cuda<scalar_t, GGN>(s, vectors, lead); });
}

}  // namespace

TORCH_LIBRARY_IMPL(hessext, CUDA, m) {
  m.impl("hvp", &products_cuda<false>);
  m.impl("ggn_vp", &products_cuda<true>);
}

}  // namespace hessext
