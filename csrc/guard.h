// The plan cache's guard in C (hessext/guard.py, ModelState): on every call, whether the objects a
// capture read are still the model's. The traversal is guard.py's ModelState.read(), item for item;
// here each object is compared as it is read (identity, else ==, as Python's list equality does)
// instead of being collected into a list (a tenth of the time).
// tests/test_trust.py checks that both answer alike after every kind of change.
#pragma once
#include <Python.h>
#include <pybind11/pybind11.h>

namespace hessext {
namespace guard {

// Compares objects read now, in order, with the list read at capture; any difference, a comparison
// that raises, or a different count is a mismatch.
class Matcher {
 public:
  explicit Matcher(PyObject* expected) : expected_(expected), n_(PyList_GET_SIZE(expected)) {}

  bool next(PyObject* now) {  // borrowed
    if (!ok_ || i_ >= n_) return ok_ = false;
    PyObject* then = PyList_GET_ITEM(expected_, i_++);
    if (now == then) return true;
    Py_INCREF(now);
    Py_INCREF(then);
    const int eq = PyObject_RichCompareBool(now, then, Py_EQ);
    Py_DECREF(now);
    Py_DECREF(then);
    if (eq < 0) PyErr_Clear();
    return ok_ = eq == 1;
  }
  bool next_owned(PyObject* now) {  // a new reference, or nullptr (an error: a mismatch)
    if (now == nullptr) {
      PyErr_Clear();
      return ok_ = false;
    }
    const bool same = next(now);
    Py_DECREF(now);
    return same;
  }
  bool next_size(Py_ssize_t size) {  // a len(), -1 when it raised
    return size < 0 ? next_owned(nullptr) : next_owned(PyLong_FromSsize_t(size));
  }
  bool keys(PyObject* dict) { return items(dict, true); }
  bool values(PyObject* dict) { return items(dict, false); }
  bool done() const { return ok_ && i_ == n_; }

 private:
  bool items(PyObject* dict, bool keys) {
    if (!PyDict_Check(dict)) return ok_ = false;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (ok_ && PyDict_Next(dict, &pos, &key, &value)) next(keys ? key : value);
    return ok_;
  }
  PyObject* expected_;
  Py_ssize_t n_, i_ = 0;
  bool ok_ = true;
};

// ModelState.read() == ModelState.objects, with read()'s arguments: parts [(module or None, __dict__,
// _parameters, _modules, _buffers, (hook dicts...))], root (the model), params, global_hooks (the
// global hook dicts), fwd_globals [(globals dict, names)], missing (the sentinel of absent names).
inline bool state_matches(pybind11::list parts, pybind11::handle root, pybind11::list params,
                          pybind11::list global_hooks, pybind11::list fwd_globals, pybind11::handle missing,
                          pybind11::list objects) {
  static PyObject* const forward = PyUnicode_InternFromString("forward");
  static PyObject* const dtype = PyUnicode_InternFromString("dtype");
  Matcher match(objects.ptr());
  for (pybind11::handle part : parts) {
    PyObject* p = part.ptr();
    if (!PyTuple_Check(p) || PyTuple_GET_SIZE(p) != 6) return false;
    PyObject* module = PyTuple_GET_ITEM(p, 0);
    PyObject* cls = reinterpret_cast<PyObject*>(Py_TYPE(module == Py_None ? root.ptr() : module));
    if (!match.next(cls) || !match.next_owned(PyObject_GetAttr(cls, forward))) return false;
    PyObject* d = PyTuple_GET_ITEM(p, 1);
    if (!match.keys(d) || !match.values(d)) return false;
    for (int j = 2; j < 5; ++j)
      if (!match.values(PyTuple_GET_ITEM(p, j))) return false;
    PyObject* hooks = PyTuple_GET_ITEM(p, 5);
    if (!PyTuple_Check(hooks)) return false;
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(hooks); ++j)
      if (!match.next_size(PyObject_Size(PyTuple_GET_ITEM(hooks, j)))) return false;
  }
  for (pybind11::handle t : params)
    if (!match.next_owned(PyObject_GetAttr(t.ptr(), dtype))) return false;
  for (pybind11::handle h : global_hooks)
    if (!match.next_size(PyObject_Size(h.ptr()))) return false;
  for (pybind11::handle entry : fwd_globals) {
    PyObject* e = entry.ptr();
    if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 2 || !PyDict_Check(PyTuple_GET_ITEM(e, 0))) return false;
    PyObject *g = PyTuple_GET_ITEM(e, 0), *names = PyTuple_GET_ITEM(e, 1);
    if (!PyTuple_Check(names)) return false;
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(names); ++j) {
      PyObject* value = PyDict_GetItemWithError(g, PyTuple_GET_ITEM(names, j));  // borrowed
      if (value == nullptr && PyErr_Occurred()) PyErr_Clear();
      if (!match.next(value ? value : missing.ptr())) return false;
    }
  }
  return match.done();
}

}  // namespace guard
}  // namespace hessext
