// Entry points of hessext._C for the tests, the benchmarks and hessext.info: the kernels' products, activation
// steps and path limits called alone, and the workspace's size. The library's own calls are in hessext.cpp.
#include "testing.h"

#include "activations.h"
#include "cpu/elementwise_cpu.h"
#include "gemm.h"
#include "losses.h"
#include "stack.h"
#include "workspace.h"

namespace hessext {

void bind_testing(pybind11::module_& m) {
  m.def(
      "set_fused_limits",
      [](int64_t max_width, int64_t max_work) {
        const auto old = std::make_pair(PathChoice::max_width(), PathChoice::max_work());
        PathChoice::max_width() = max_width;
        PathChoice::max_work() = max_work;
        return old;
      },
      "set the largest width and sample*vector*parameter work served by the fused kernels; returns the old pair");
  m.def("set_row_pieces", &set_row_pieces,
        "cut products into row pieces for OpenBLAS's small-matrix path (default on); returns the old setting");
  m.def("row_pieces_on", &row_pieces_on, "whether products are cut into row pieces now");
  m.def("mm", &mm, "A @ B as the kernels compute it (for tests)");
  m.def(
      "mm_into", [](const at::Tensor& C, const at::Tensor& A, const at::Tensor& B) { mm_into(C, A, B); },
      "C = A @ B into a given tensor, as the kernels compute it (for benchmarks: no allocation timed)");
  m.def(
      "addmm",
      [](const at::Tensor& bias, const at::Tensor& A, const at::Tensor& B) {
        at::Tensor C = at::empty({A.size(0), B.size(1)}, A.options());
        addmm_into(C, bias, A, B);
        return C;
      },
      "bias + A @ B as the kernels compute it (for tests)");
  m.def("addmm_", &addmm_, "C += A @ B in place as the kernels compute it (for tests)");
  m.def(
      "activation",
      [](const at::Tensor& z, int64_t kind, double p0, double p1) {
        TORCH_CHECK_VALUE(z.device().is_cpu() && z.is_floating_point(), "z must be a floating-point CPU tensor");
        TORCH_CHECK_VALUE(kind >= 0 && kind < kNumActs, "kind must be an activations.h row, 0 to ", kNumActs - 1,
                          ", got ", kind);
        const auto act = static_cast<Act>(kind);
        at::Tensor a = z.mul(CpuElementwise::input_scale(act)).contiguous();
        at::Tensor d = at::empty_like(a), d2 = at::empty_like(a);
        CpuElementwise::activation(a, act, p0, p1, d, d2);
        return std::make_tuple(a, d, d2);
      },
      "phi(z), phi'(z), phi''(z) of an activations.h row as the CPU kernels compute them (for tests)");
  m.def(
      "table_names",
      [] {
        return std::make_pair(std::vector<std::string>(kActNames, kActNames + kNumActs),
                              std::vector<std::string>(kLossNames, kLossNames + kNumLosses));
      },
      "(activation row names, loss row names) in the order of csrc/activations.h and csrc/losses.h");
  m.def("workspace_bytes", &workspace_bytes, "bytes of scratch the calling thread keeps between calls (workspace.h)");
}

}  // namespace hessext
