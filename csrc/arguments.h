// The native path's common case of hessext/inputs.py's checks in one C call (hessext/_route.py): the batch
// (check_batch), its finiteness (all_finite) and the user's vectors, a dict or list/tuple, exactly as
// expected (pack_vectors). Anything else answers None, and inputs.py's own checks then raise the error
// that names the argument; so this never accepts what those checks reject, it only makes the accepting
// answer cheap (a tenth of inputs.py's time for the 1-16-1 network's four vectors).
#pragma once
#include <torch/extension.h>

#include <cmath>
#include <cstring>

#include "cpu/lanes.h"

namespace hessext {
namespace arguments {

// (items in parameter order, K) when `vectors` (a dict name -> tensor with exactly `names`, or a list or
// tuple of as many tensors) holds dense tensors of params[0]'s dtype and device shaped like `params`
// (K = 0) or each with the same leading K >= 1 (K); else None.
inline pybind11::object vector_items(pybind11::handle vectors, pybind11::list names,
                                     const std::vector<at::Tensor>& params) {
  PyObject* v = vectors.ptr();
  const Py_ssize_t n = PyList_GET_SIZE(names.ptr());
  if (params.empty() || static_cast<Py_ssize_t>(params.size()) != n) return pybind11::none();
  pybind11::list items(n);
  const bool dict = PyDict_CheckExact(v);
  if (dict
          ? PyDict_GET_SIZE(v) != n
          : !((PyList_CheckExact(v) && PyList_GET_SIZE(v) == n) || (PyTuple_CheckExact(v) && PyTuple_GET_SIZE(v) == n)))
    return pybind11::none();
  const at::Tensor& ref = params[0];
  int64_t K = -1;  // -1: not decided yet, 0: unbatched
  for (Py_ssize_t j = 0; j < n; ++j) {
    PyObject* item = dict ? PyDict_GetItemWithError(v, PyList_GET_ITEM(names.ptr(), j))
                          : (PyList_CheckExact(v) ? PyList_GET_ITEM(v, j) : PyTuple_GET_ITEM(v, j));
    if (item == nullptr) {
      PyErr_Clear();
      return pybind11::none();
    }
    if (!THPVariable_Check(item)) return pybind11::none();
    const at::Tensor& t = THPVariable_Unpack(item);
    if (t.scalar_type() != ref.scalar_type() || t.device() != ref.device() || t.layout() != at::kStrided)
      return pybind11::none();
    const at::IntArrayRef shape = t.sizes(), want = params[j].sizes();
    if (K < 0) K = shape == want ? 0 : (shape.size() == want.size() + 1 && shape[0] >= 1 ? shape[0] : -2);
    if (K == -2 ||
        (K == 0 ? shape != want : (shape.size() != want.size() + 1 || shape[0] != K || shape.slice(1) != want)))
      return pybind11::none();
    Py_INCREF(item);
    PyList_SET_ITEM(items.ptr(), j, item);
  }
  return pybind11::make_tuple(items, K);
}

// Whether every entry of every floating-point tensor is finite (the native path's precondition, see
// hessext/inputs.py). Contiguous CPU tensors in one loop (x - x is 0 for finite x, NaN for inf and
// NaN; the sums of x - x run in SIMD lanes, compiled for this CPU's vectors by run_simd: a tenth of
// ATen's isfinite/all/item per tensor). The rest (CUDA tensors above all) as one max-abs reduction
// each and one read-back for all of them (ATen's per-tensor check syncs twice per tensor): the max
// propagates NaN and shows inf, and cannot overflow.
inline bool all_finite(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> maxima;
  for (const auto& t : tensors) {
    if (!at::isFloatingType(t.scalar_type()) || t.numel() == 0) continue;
    const bool loop =
        t.device().is_cpu() && t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
    if (!loop) {
      maxima.push_back(at::linalg_vector_norm(t, INFINITY, c10::nullopt, false, at::kDouble));
      continue;
    }
    const bool ok = AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "all_finite", [&] {
      const scalar_t* p = t.data_ptr<scalar_t>();
      const int64_t n = t.numel();
      bool bad = false;
      constexpr int W = lanes_of<scalar_t>(Simd::AVX2);
      run_simd([&] {  // x - x summed in W lanes: a NaN in any lane is a non-finite entry
        using Vec = typename Lanes<scalar_t, W>::Vec;
        Vec acc{};
        int64_t j = 0;
        for (; j + W <= n; j += W) {
          Vec v;
          std::memcpy(&v, p + j, sizeof v);
          acc += v - v;
        }
        for (int lane = 0; lane < W; ++lane) bad |= !(acc[lane] == scalar_t(0));
        for (; j < n; ++j) bad |= !(p[j] - p[j] == scalar_t(0));
      });
      return !bad;
    });
    if (!ok) return false;
  }
  // One device: the callers' batch passed check_batch, which puts inputs and targets on one.
  return maxima.empty() || std::isfinite(at::stack(maxima).max().item<double>());
}

// Whether `obj` is a dense CPU tensor on ref's device whose dtype is ref's (kind 0), ref's or an integer
// type (kind 1: class probabilities or indices), or an integer type (kind 2: NLL's class indices).
inline const at::Tensor* batch_tensor(PyObject* obj, const at::Tensor& ref, int kind) {
  if (!THPVariable_Check(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.layout() != at::kStrided || t.device() != ref.device() || !t.device().is_cpu()) return nullptr;
  const bool same = t.scalar_type() == ref.scalar_type();
  const bool index = at::isIntegralType(t.scalar_type(), /*includeBool=*/false);
  return (kind == 0 ? same : kind == 1 ? same || index : index) ? &t : nullptr;
}

// (finite, vector_items(vectors, names, params) or None) when the batch passes check_batch as the native
// path's: inputs and targets (None: a model-only quantity) dense CPU tensors on ref's device, the inputs
// of ref's dtype with at least one sample, the targets as `target_kind` says (batch_tensor); finite:
// whether every floating entry of both is (all_finite). vectors None: no vectors, None in the answer.
// Else None (the Python checks decide: an error, CUDA, or a case they accept differently).
inline pybind11::object native_arguments(pybind11::handle inputs, pybind11::handle targets, const at::Tensor& ref,
                                         int target_kind, pybind11::handle vectors, pybind11::list names,
                                         const std::vector<at::Tensor>& params) {
  const at::Tensor* x = batch_tensor(inputs.ptr(), ref, 0);
  if (x == nullptr || x->dim() == 0 || x->size(0) == 0) return pybind11::none();
  std::vector<at::Tensor> batch{*x};
  if (!targets.is_none()) {
    const at::Tensor* y = batch_tensor(targets.ptr(), ref, target_kind);
    if (y == nullptr) return pybind11::none();
    batch.push_back(*y);
  }
  pybind11::object found = pybind11::none();
  if (!vectors.is_none()) {
    found = vector_items(vectors, names, params);
    if (found.is_none()) return found;
  }
  return pybind11::make_tuple(all_finite(batch), found);
}

}  // namespace arguments
}  // namespace hessext
