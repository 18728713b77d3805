// The common case of hessext/inputs.py's pack_vectors in C: the user's vectors, a dict or list/tuple,
// exactly as expected. Anything else answers None, and inputs.py's own checks then raise the error
// that names the argument; so this never accepts what those checks reject, it only makes the
// accepting answer cheap (a tenth of inputs.py's time for the 1-16-1 network's four vectors).
#pragma once
#include <torch/extension.h>

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

}  // namespace arguments
}  // namespace hessext
