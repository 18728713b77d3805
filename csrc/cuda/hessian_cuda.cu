// CUDA kernels of hessext::hessian and hessext::input_derivatives: the structured recurrences of
// hessian.h and jets.h (cuBLAS through ATen) with the fused elementwise kernels.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/elementwise_cuda.cuh"
#include "hessian.h"

namespace hessext {
namespace {

std::vector<at::Tensor> hessian_cuda(HX_STACK_PARAMS, bool layer_blocks) {
  const c10::cuda::CUDAGuard guard(inputs.device());
  const Stack s(HX_STACK_ARGS);
  return hessian<CudaElementwise>(s, layer_blocks, kHessianChunkElems);
}

at::Tensor input_derivatives_cuda(HX_STACK_PARAMS, int64_t mode) {
  const c10::cuda::CUDAGuard guard(inputs.device());
  const Stack s(HX_STACK_ARGS);
  return input_derivatives_any<CudaElementwise>(s, input_derivatives_plan(s, mode), kHessianChunkElems);
}

}  // namespace

TORCH_LIBRARY_IMPL(hessext, CUDA, m) {
  m.impl("hessian", &hessian_cuda);
  m.impl("input_derivatives", &input_derivatives_cuda);
}

}  // namespace hessext
