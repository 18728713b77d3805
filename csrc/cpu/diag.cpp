// CPU kernel of hessext::diag: exact Hessian or GGN diagonals (diag.h) with the CPU elementwise steps.
#include <torch/library.h>

#include "cpu/elementwise_cpu.h"
#include "diag.h"

namespace hessext {
namespace {

std::vector<at::Tensor> diag_cpu(const at::Tensor& inputs, const at::Tensor& targets, at::TensorList weights,
                                 const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                                 double scale, bool ggn, bool per_sample) {
  const Stack s(inputs, targets, weights, biases, activations, scale);
  return diag<CpuElementwise>(s, ggn, per_sample);
}

}  // namespace

TORCH_LIBRARY_IMPL(hessext, CPU, m) { m.impl("diag", &diag_cpu); }

}  // namespace hessext
