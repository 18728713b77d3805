// CPU kernels of hessext::hessian (dense and block-diagonal weight Hessians, hessian.h) and
// hessext::input_derivatives (Laplacians and input Hessians: jets.h, or the backward recurrence of
// hessian.h when the input is wide).
#include <torch/library.h>

#include "cpu/elementwise_cpu.h"
#include "hessian.h"
#include "jets.h"

namespace hessext {
namespace {

constexpr int64_t kChunkElems = int64_t(1) << 24;

std::vector<at::Tensor> hessian_cpu(const at::Tensor& inputs, const at::Tensor& targets, at::TensorList weights,
                                    const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                                    double scale, bool layer_blocks) {
  const Stack s(inputs, targets, weights, biases, activations, scale);
  return hessian<CpuElementwise>(s, layer_blocks, kChunkElems);
}

at::Tensor input_derivatives_cpu(const at::Tensor& inputs, const at::Tensor& targets, at::TensorList weights,
                                 const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                                 double scale, int64_t mode) {
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0 (Laplacian), 1 (diagonal) or 2 (full), got ", mode);
  const Stack s(inputs, targets, weights, biases, activations, scale);
  const JetMode jm = static_cast<JetMode>(mode);
  if (jm != JetMode::Laplacian) {  // jets cost M sum n_l n_{l+1} (1+d+q); backward M (sum n^3 + n_1^2 d)
    const int64_t d = s.width(0), q = jet_channels(jm, d);
    int64_t jets = 0, back = s.width(1) * s.width(1) * d;
    for (int64_t l = 0; l < s.L; ++l) {
      jets += s.width(l) * s.width(l + 1) * (1 + d + q);
      if (l > 0) back += 2 * s.width(l) * s.width(l + 1) * s.width(l + 1);
    }
    if (back < jets) return input_hessian_backward<CpuElementwise>(s, jm == JetMode::Diagonal, kChunkElems);
  }
  return input_derivatives<CpuElementwise>(s, jm);
}

}  // namespace

TORCH_LIBRARY_IMPL(hessext, CPU, m) {
  m.impl("hessian", &hessian_cpu);
  m.impl("input_derivatives", &input_derivatives_cpu);
}

}  // namespace hessext
