// Every hessext op schema, in one place, and the pybind11 module: the ops' direct entries, the per-call
// checks (arguments.h) and the build facts (the entries for tests and benchmarks: testing.cpp).
// Kernels register per device: csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA).
// Common arguments (see stack.h): inputs [M, n_0], targets [M, C] (real rows; for cross-entropy the
// target distribution), weights W_l [n_{l+1}, n_l], biases b_l [n_{l+1}] or None, activations
// (activations.h: Act) after each hidden layer with two parameters each in act_params, the loss
// (losses.h: Loss) with its parameter (Huber's delta) and the scale of its sum over samples;
// parameter lists are in stack order W_0, b_0, W_1, ...
#include <torch/extension.h>
#include <torch/version.h>

#include "arguments.h"
#include "cpu/lanes.h"
#include "gemm.h"
#include "guard.h"
#include "stack.h"
#include "testing.h"
#ifdef WITH_CUDA
#include <cuda.h>
#endif

TORCH_LIBRARY(hessext, m) {
  // K Hessian-vector products; vectors[j]: [K, *shape of parameter j], or [*shape] for one vector;
  // returns the same shapes.
  m.def(
      "hvp(Tensor inputs, Tensor targets, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "float[] act_params, int loss, float loss_param, float scale, Tensor[] vectors) -> Tensor[]");
  // K GGN-vector products J^T H_out J v (H_out: the loss Hessian in the output), same layout as hvp.
  m.def(
      "ggn_vp(Tensor inputs, Tensor targets, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "float[] act_params, int loss, float loss_param, float scale, Tensor[] vectors) -> Tensor[]");
  // Exact diagonal of the Hessian (ggn=False) or GGN (ggn=True) per parameter, [*shape] or, with
  // per_sample, [M, *shape] (the diagonal of each sample's term of the loss).
  m.def(
      "diag(Tensor inputs, Tensor targets, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "float[] act_params, int loss, float loss_param, float scale, bool ggn, bool per_sample) -> Tensor[]");
  // The dense Hessian in stack order: [H] with H [P, P], or (layer_blocks) one [P_l, P_l] per layer.
  m.def(
      "hessian(Tensor inputs, Tensor targets, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "float[] act_params, int loss, float loss_param, float scale, bool layer_blocks) -> Tensor[]");
  // mode 0: the Laplacian of each model output in the inputs, [M, C] (targets unused);
  // mode 1 / 2: the Hessian of the loss in each sample's input row, diagonal [M, d] / full [M, d, d].
  m.def(
      "input_derivatives(Tensor inputs, Tensor targets, Tensor[] weights, Tensor?[] biases, "
      "int[] activations, float[] act_params, int loss, float loss_param, float scale, int mode) -> Tensor");
  // The jet at the output, [1 + k + q, M, C]: the model output, its derivatives in the k input features
  // `features`, and the second-order channels of mode (0: the Laplacian over the features, q = 1;
  // 1: the unmixed second derivatives, q = k; 2: each pair i <= j, q = k (k + 1) / 2; targets unused);
  // with save, then each hidden layer's jet before and after its activation, for output_jets_backward
  // (the op's autograd formula).
  m.def(
      "output_jets(Tensor inputs, Tensor targets, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "float[] act_params, int loss, float loss_param, float scale, int mode, int[] features, bool save) "
      "-> Tensor[]");
  // Gradients [dx, dW_0, ..., dW_{L-1}, db_l of each layer with a bias] from grad [1 + k + q, M, C], the
  // gradient in output_jets' output jet, and its saved jets.
  m.def(
      "output_jets_backward(Tensor inputs, Tensor targets, Tensor[] weights, Tensor?[] biases, "
      "int[] activations, float[] act_params, int loss, float loss_param, float scale, int mode, int[] features, "
      "Tensor[] saved, Tensor grad) -> Tensor[]");
  // The tangent [k + 2, M, K, C] of the Laplacian's output jet (mode 0) along K weight directions dW_l
  // [K, o_l, n_l], db_l [K, o_l] (None: no direction in that bias), from output_jets' saved jets.
  m.def(
      "output_jets_tangent(Tensor inputs, Tensor targets, Tensor[] weights, Tensor?[] biases, "
      "int[] activations, float[] act_params, int loss, float loss_param, float scale, int[] features, "
      "Tensor[] saved, Tensor[] dW, Tensor?[] db) -> Tensor");
  // Its transpose: [dW_l ([K, o_l, n_l]) per layer, then db_l ([K, o_l]) per layer with a bias] for K
  // gradients grad [k + 2, M, K, C] in the Laplacian's output jet, summed over the samples.
  m.def(
      "output_jets_vjp(Tensor inputs, Tensor targets, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "float[] act_params, int loss, float loss_param, float scale, int[] features, Tensor[] saved, Tensor grad) "
      "-> Tensor[]");
}

namespace {
bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Direct entries: hessext._C.<op>(...) makes the same dispatcher call as torch.ops.hessext.<op>(...)
// without torch.ops' parsing of the Python arguments against the schema (a tenth of a small call),
// and below the autograd keys, as under no_grad: the ops have no derivative of their own. hessext/ops.py
// takes torch.ops while torch.compile traces.
using Tensors = std::vector<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

c10::List<c10::optional<at::Tensor>> bias_list(const std::vector<c10::optional<at::Tensor>>& biases) {
  c10::List<c10::optional<at::Tensor>> out;
  out.reserve(biases.size());
  for (const auto& b : biases) out.push_back(b);
  return out;
}

// How pybind11 takes an op argument of type T.
template <typename T>
struct PyArg {
  using type = T;
};
template <>
struct PyArg<at::TensorList> {
  using type = const Tensors&;
};
template <>
struct PyArg<at::IntArrayRef> {
  using type = const std::vector<int64_t>&;
};
template <>
struct PyArg<const c10::List<c10::optional<at::Tensor>>&> {
  using type = const std::vector<c10::optional<at::Tensor>>&;
};
// A Python-side argument as the kernel takes it (a list of optional tensors as c10's List).
inline c10::List<c10::optional<at::Tensor>> to_arg(const std::vector<c10::optional<at::Tensor>>& v) {
  return bias_list(v);
}
template <typename T>
const T& to_arg(const T& v) {
  return v;
}

// hessext._C.<name>(stack arguments, rest...) calling the op `qualified` with kernel signature
// Ret(HX_STACK_PARAMS, Rest...).
template <typename Ret, typename... Rest>
void bind_direct(py::module& m, const char* name, const char* qualified) {
  const auto op = typed_op<Ret(HX_STACK_PARAMS, Rest...)>(qualified);
  m.def(
      name,
      [op](const at::Tensor& inputs, const at::Tensor& targets, const Tensors& weights,
           const std::vector<c10::optional<at::Tensor>>& biases, const std::vector<int64_t>& activations,
           const std::vector<double>& act_params, int64_t loss, double loss_param, double scale,
           typename PyArg<Rest>::type... rest) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;
        return op.call(inputs, targets, weights, bias_list(biases), activations, act_params, loss, loss_param, scale,
                       to_arg(rest)...);
      },
      "the op of the same name in torch.ops.hessext, called directly (no autograd)");
}

int64_t cuda_version() {
#ifdef WITH_CUDA
  return CUDA_VERSION;
#else
  return -1;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hessext native kernels: the ops of torch.ops.hessext, and direct entries to them";
  // The ops' argument errors as torch.ops raises them (ValueError, TypeError), not pybind11's RuntimeError.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  hessext::bind_testing(m);
  m.def("cuda_version", &cuda_version, "CUDA_VERSION the extension was built with, -1 without CUDA");
  m.def("blas_load", &hessext::blas_load,
        "load a BLAS (OpenBLAS, MKL, BLIS) for the CPU products; returns (its index, '') or (-1, why not)");
  m.def("blas_names", &hessext::blas_names, "the loaded BLAS libraries' names, by index");
  m.def("blas_choose", &hessext::blas_choose, py::arg("is_double"), py::arg("product_class"), py::arg("index"),
        "which loaded library (-1: ATen) serves float64/float32 products of a class (0 narrow, 1 wide); returns "
        "the old choice");
  m.def("product_class", &hessext::product_class, py::arg("m"), py::arg("k"), py::arg("n"),
        "0 (narrow) or 1 (wide) for an [m, k] x [k, n] product");
  m.def("all_finite", &hessext::arguments::all_finite, "whether every entry of every floating-point tensor is finite");
  bind_direct<Tensors, at::TensorList>(m, "hvp", "hessext::hvp");
  bind_direct<Tensors, at::TensorList>(m, "ggn_vp", "hessext::ggn_vp");
  bind_direct<Tensors, bool, bool>(m, "diag", "hessext::diag");
  bind_direct<Tensors, bool>(m, "hessian", "hessext::hessian");
  bind_direct<at::Tensor, int64_t>(m, "input_derivatives", "hessext::input_derivatives");
  bind_direct<Tensors, int64_t, at::IntArrayRef, bool>(m, "output_jets", "hessext::output_jets");
  bind_direct<Tensors, int64_t, at::IntArrayRef, at::TensorList, const at::Tensor&>(m, "output_jets_backward",
                                                                                    "hessext::output_jets_backward");
  bind_direct<at::Tensor, at::IntArrayRef, at::TensorList, at::TensorList, const c10::List<c10::optional<at::Tensor>>&>(
      m, "output_jets_tangent", "hessext::output_jets_tangent");
  bind_direct<Tensors, at::IntArrayRef, at::TensorList, const at::Tensor&>(m, "output_jets_vjp",
                                                                           "hessext::output_jets_vjp");
  m.def(
      "simd",
      [](const std::string& name) {
        const std::string old = hessext::kSimdNames[static_cast<int>(hessext::simd_in_use())];
        if (name.empty()) return old;
        for (int j = 0; j <= static_cast<int>(hessext::cpu_simd()); ++j)
          if (name == hessext::kSimdNames[j]) {
            hessext::simd_in_use() = static_cast<hessext::Simd>(j);
            return old;
          }
        TORCH_CHECK_VALUE(false, "simd must be one of this CPU's instruction sets, baseline to ",
                          hessext::kSimdNames[static_cast<int>(hessext::cpu_simd())], ", got '", name, "'");
      },
      py::arg("name") = "",
      "the instruction set of the CPU's sample-lane kernels (cpu/lanes.h); a name sets it (tests); returns the one "
      "before");
  m.def("state_matches", &hessext::guard::state_matches,
        "hessext.guard.ModelState.read() == its objects, compared as read (csrc/guard.h)");
  m.def("vector_items", &hessext::arguments::vector_items,
        "hessext.inputs.pack_vectors' common case: (items, K) or None (csrc/arguments.h)");
  m.def(
      "native_arguments",
      [](py::handle inputs, py::handle targets, const at::Tensor& ref, int target_kind, py::handle vectors,
         py::list names, const std::vector<at::Tensor>& params) {
        return hessext::arguments::native_arguments(inputs, targets, ref, target_kind, vectors, names, params);
      },
      "the native path's batch checks, finiteness and vectors in one call: (finite, (items, K) or None) or None "
      "(csrc/arguments.h)");
  m.def("torch_version", [] { return std::string(TORCH_VERSION); }, "torch version built against");
}
