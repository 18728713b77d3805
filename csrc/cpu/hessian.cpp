// CPU kernels of hessext::hessian (dense and block-diagonal weight Hessians, hessian.h) and
// hessext::input_derivatives (Laplacians and input Hessians: jets.h, or the backward recurrence of
// hessian.h when the input is wide).
#include <torch/library.h>

#include "cpu/elementwise_cpu.h"
#include "hessian.h"

namespace hessext {
namespace {

std::vector<at::Tensor> hessian_cpu(const at::Tensor& inputs, const at::Tensor& targets, at::TensorList weights,
                                    const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                                    double scale, bool layer_blocks) {
  const Stack s(inputs, targets, weights, biases, activations, scale);
  return hessian<CpuElementwise>(s, layer_blocks, kHessianChunkElems);
}

at::Tensor input_derivatives_cpu(const at::Tensor& inputs, const at::Tensor& targets, at::TensorList weights,
                                 const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                                 double scale, int64_t mode) {
  const Stack s(inputs, targets, weights, biases, activations, scale);
  return input_derivatives_any<CpuElementwise>(s, mode, kHessianChunkElems);
}

}  // namespace

TORCH_LIBRARY_IMPL(hessext, CPU, m) {
  m.impl("hessian", &hessian_cpu);
  m.impl("input_derivatives", &input_derivatives_cpu);
}

}  // namespace hessext
