// CPU kernels of hessext::output_jets (the model output, its derivatives in chosen input features and
// the second-order channels of a jet mode, from one forward pass of jets.h), of their reverse pass,
// hessext::output_jets_backward, which hessext/ops.py registers as the op's autograd formula, and of
// the Laplacian jets' tangent along weight directions, hessext::output_jets_tangent, and its transpose,
// hessext::output_jets_vjp.
#include "jets.h"

#include <torch/library.h>

#include "cpu/elementwise_cpu.h"
#include "cpu/row_blocks.h"

namespace hessext {
namespace {

std::vector<int64_t> checked_features(const Stack& s, at::IntArrayRef features) {
  const int64_t d = s.width(0);
  std::vector<bool> seen(d, false);
  TORCH_CHECK_VALUE(!features.empty(), "features must name at least one input feature");
  for (const int64_t i : features) {
    TORCH_CHECK_VALUE(i >= 0 && i < d && !seen[i], "features must be distinct indices of the ", d,
                      " input features, got ", features);
    seen[i] = true;
  }
  return features.vec();
}

// output_jets' saved jets, checked against the stack and the jet's channel count, contiguous.
std::vector<at::Tensor> checked_saved(const Stack& s, at::TensorList saved, int64_t cols) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(saved.size()) == 2 * (s.L - 1), "saved must hold ", 2 * (s.L - 1),
                    " jets, got ", saved.size());
  std::vector<at::Tensor> jets(saved.begin(), saved.end());
  for (size_t j = 0; j < jets.size(); ++j) {
    CHECK_SHAPE(jets[j], cols, s.M, s.W[j / 2].size(0));
    jets[j] = jets[j].contiguous();
  }
  return jets;
}

JetMode checked_mode(int64_t mode) {
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0 (Laplacian), 1 (diagonal) or 2 (full), got ", mode);
  return static_cast<JetMode>(mode);
}

// [jet [1 + k + q, M, C]] or, with save, [jet, Z_0, A_1, ..., Z_{L-2}, A_{L-1}] (output_jet's saved jets).
// Without save, each thread runs the pass for its block of samples (row_blocks.h: its products
// single-threaded, no fork and join per product and activation step).
std::vector<at::Tensor> output_jets_cpu(HX_STACK_PARAMS, int64_t mode, at::IntArrayRef features, bool save) {
  const Stack s(HX_STACK_ARGS);
  const JetMode jm = checked_mode(mode);
  const std::vector<int64_t> chosen = checked_features(s, features);
  if (!save) {
    const int64_t d = static_cast<int64_t>(chosen.size());
    const int64_t per_sample = jet_multiply_adds(s, 1 + d + jet_channels(jm, d));
    const auto block = [&](const Stack& part) {  // the scratch's jet, as a tensor of its own
      return output_jet<CpuElementwise>(part, jm, &chosen).clone();
    };
    return {cat_over_row_blocks(s, s.M * per_sample, block, 1)};
  }
  std::vector<at::Tensor> saved;
  at::Tensor jet = output_jet<CpuElementwise>(s, jm, &chosen, &saved);
  saved.insert(saved.begin(), jet);
  return saved;
}

// [dx, dW_0, ..., dW_{L-1}, then db_l for each layer that has a bias] for the gradient grad
// [1 + k + q, M, C] in output_jets' output jet.
std::vector<at::Tensor> output_jets_backward_cpu(HX_STACK_PARAMS, int64_t mode, at::IntArrayRef features,
                                                 at::TensorList saved, const at::Tensor& grad) {
  const Stack s(HX_STACK_ARGS);
  const JetMode jm = checked_mode(mode);
  const std::vector<int64_t> chosen = checked_features(s, features);
  const int64_t k = static_cast<int64_t>(chosen.size()), cols = 1 + k + jet_channels(jm, k);
  CHECK_SHAPE(grad, cols, s.M, s.width(s.L));
  CHECK_SAME_DTYPE(grad, s.x);
  const std::vector<at::Tensor> jets = checked_saved(s, saved, cols);
  std::vector<at::Tensor> all = output_jet_backward<CpuElementwise>(s, jm, chosen, jets, grad.contiguous());
  std::vector<at::Tensor> out(all.begin(), all.begin() + 1 + s.L);
  for (int64_t l = 0; l < s.L; ++l)
    if (all[1 + s.L + l].defined()) out.push_back(all[1 + s.L + l]);
  return out;
}

// The Laplacian jet's tangent [k + 2, M, K, C] along K weight directions dW_l [K, o_l, n_l], db_l [K, o_l]
// (None: none in that bias), from output_jets' saved jets (mode 0, these features).
at::Tensor output_jets_tangent_cpu(HX_STACK_PARAMS, at::IntArrayRef features, at::TensorList saved, at::TensorList dW,
                                   const c10::List<c10::optional<at::Tensor>>& db) {
  const Stack s(HX_STACK_ARGS);
  const std::vector<int64_t> chosen = checked_features(s, features);
  const int64_t cols = static_cast<int64_t>(chosen.size()) + 2;
  TORCH_CHECK_VALUE(static_cast<int64_t>(dW.size()) == s.L && static_cast<int64_t>(db.size()) == s.L,
                    "dW and db must hold one entry per layer (", s.L, "), got ", dW.size(), " and ", db.size());
  const int64_t K = dW[0].size(0);
  const std::vector<at::Tensor> jets = checked_saved(s, saved, cols);
  std::vector<at::Tensor> dWs, dbs;
  for (int64_t l = 0; l < s.L; ++l) {
    CHECK_SHAPE(dW[l], K, s.W[l].size(0), s.W[l].size(1));
    CHECK_SAME_DTYPE(dW[l], s.x);
    dWs.push_back(dW[l].contiguous());
    const c10::optional<at::Tensor> b = db.get(l);
    if (b.has_value() && b->defined()) {
      CHECK_SHAPE((*b), K, s.W[l].size(0));
      CHECK_SAME_DTYPE((*b), s.x);
      dbs.push_back(b->contiguous());
    } else {
      dbs.emplace_back();
    }
  }
  return output_jet_tangent<CpuElementwise>(s, chosen, jets, dWs, dbs);
}

// [dW_0, ..., dW_{L-1} ([K, o, n]), then db_l ([K, o]) for each layer that has a bias] for K gradients
// grad [k + 2, M, K, C] in the Laplacian's output jet (the transpose of output_jets_tangent).
std::vector<at::Tensor> output_jets_vjp_cpu(HX_STACK_PARAMS, at::IntArrayRef features, at::TensorList saved,
                                            const at::Tensor& grad) {
  const Stack s(HX_STACK_ARGS);
  const std::vector<int64_t> chosen = checked_features(s, features);
  const int64_t cols = static_cast<int64_t>(chosen.size()) + 2;
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == cols && grad.size(1) == s.M && grad.size(3) == s.width(s.L),
                    "grad must have shape [", cols, ", ", s.M, ", K, ", s.width(s.L), "], got ", grad.sizes());
  CHECK_SAME_DTYPE(grad, s.x);
  std::vector<at::Tensor> all =
      output_jet_vjp<CpuElementwise>(s, chosen, checked_saved(s, saved, cols), grad.contiguous());
  std::vector<at::Tensor> out(all.begin(), all.begin() + s.L);
  for (int64_t l = 0; l < s.L; ++l)
    if (all[s.L + l].defined()) out.push_back(all[s.L + l]);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hessext, CPU, m) {
  m.impl("output_jets_vjp", &output_jets_vjp_cpu);
  m.impl("output_jets_tangent", &output_jets_tangent_cpu);
  m.impl("output_jets", &output_jets_cpu);
  m.impl("output_jets_backward", &output_jets_backward_cpu);
}

}  // namespace hessext
