// tensor_watch.cpp: see tensor_watch.h. Every function here runs with the GIL held: it only
// reads Python objects and compares addresses; no tensor memory is touched.
#include "common/tensor_watch.h"

#include <stdexcept>

namespace py = pybind11;

namespace tp {
namespace {

using ReaderFn = void* (*)(PyObject*);
ReaderFn g_reader = nullptr;
PyObject* g_fallback = nullptr;  // owned; a Python callable tensor -> int

std::uintptr_t read_ptr(PyObject* tensor) {
  if (g_reader != nullptr) return reinterpret_cast<std::uintptr_t>(g_reader(tensor));
  if (g_fallback == nullptr) throw std::logic_error("tensor_watch: no data-pointer reader was installed");
  PyObject* r = PyObject_CallOneArg(g_fallback, tensor);
  if (r == nullptr) throw py::error_already_set();
  const unsigned long long v = PyLong_AsUnsignedLongLong(r);
  Py_DECREF(r);
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<std::uintptr_t>(v);
}

// Whether the weak reference `ref` still points at `obj` (a dead reference points at nothing).
bool refers_to(PyObject* ref, PyObject* obj) {
#if PY_VERSION_HEX >= 0x030D0000
  PyObject* target = nullptr;
  if (PyWeakref_GetRef(ref, &target) < 0) {
    PyErr_Clear();
    return false;
  }
  const bool same = target == obj;
  Py_XDECREF(target);
  return same;
#else
  return PyWeakref_GET_OBJECT(ref) == obj;
#endif
}

PyObject* new_ref(PyObject* o) {  // Py_NewRef, which Python 3.9 lacks
  Py_INCREF(o);
  return o;
}

PyObject* grad_name() {
  static PyObject* name = PyUnicode_InternFromString("grad");  // immortal for the process
  return name;
}

// p.grad as a new reference; throws on a failing attribute read.
PyObject* grad_of(PyObject* p) {
  PyObject* g = PyObject_GetAttr(p, grad_name());
  if (g == nullptr) throw py::error_already_set();
  return g;
}

}  // namespace

void set_data_ptr_reader(std::uintptr_t fn_addr, py::object fallback) {
  g_reader = reinterpret_cast<ReaderFn>(fn_addr);
  PyObject* old = g_fallback;
  g_fallback = fallback.is_none() ? nullptr : fallback.release().ptr();
  Py_XDECREF(old);
}

std::vector<std::uintptr_t> data_ptrs(const py::list& tensors) {
  const Py_ssize_t n = PyList_GET_SIZE(tensors.ptr());
  std::vector<std::uintptr_t> out(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) out[i] = read_ptr(PyList_GET_ITEM(tensors.ptr(), i));
  return out;
}

TensorWatch::TensorWatch(const py::list& params, const std::vector<int64_t>& active, const py::list& grads)
    : active_(active) {
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  if (static_cast<size_t>(PyList_GET_SIZE(grads.ptr())) != active.size())
    throw std::invalid_argument("TensorWatch: one gradient per active position is needed");
  has_grad_.assign(static_cast<size_t>(n), 0);
  param_ptrs_.reserve(active.size());
  for (int64_t i : active) {
    if (i < 0 || i >= n) throw std::invalid_argument("TensorWatch: active position out of range");
    if (has_grad_[static_cast<size_t>(i)]) throw std::invalid_argument("TensorWatch: active position repeated");
    has_grad_[static_cast<size_t>(i)] = 1;
    param_ptrs_.push_back(read_ptr(PyList_GET_ITEM(params.ptr(), i)));
  }
  // rank_[j]: how many active positions come before active_[j], i.e. its index in position order.
  std::vector<size_t> rank_of_position(static_cast<size_t>(n), 0);
  for (size_t s = 0, r = 0; s < has_grad_.size(); ++s)
    if (has_grad_[s]) rank_of_position[s] = r++;
  for (int64_t i : active) rank_.push_back(rank_of_position[static_cast<size_t>(i)]);
  set_grads(grads, data_ptrs(grads));
}

TensorWatch::~TensorWatch() { drop_refs(); }

void TensorWatch::drop_refs() {
  for (PyObject* r : grad_refs_) Py_DECREF(r);
  grad_refs_.clear();
}

void TensorWatch::set_grads(const py::list& grads, const std::vector<std::uintptr_t>& addrs) {
  const size_t n = static_cast<size_t>(PyList_GET_SIZE(grads.ptr()));
  if (n != active_.size() || addrs.size() != n)
    throw std::invalid_argument("TensorWatch.set_grads: one gradient and one address per active position");
  std::vector<PyObject*> refs;
  refs.reserve(n);
  for (size_t k = 0; k < n; ++k) {
    PyObject* r = PyWeakref_NewRef(PyList_GET_ITEM(grads.ptr(), k), nullptr);
    if (r == nullptr) {
      for (PyObject* done : refs) Py_DECREF(done);
      throw py::error_already_set();
    }
    refs.push_back(r);
  }
  drop_refs();
  grad_refs_ = std::move(refs);
  grad_ptrs_ = addrs;
}

WatchStatus TensorWatch::check(const py::list& params, const py::object& grads, py::list* picked) const {
  PyObject* list = params.ptr();
  if (static_cast<size_t>(PyList_GET_SIZE(list)) != has_grad_.size()) return WatchStatus::Changed;
  PyObject* given = grads.is_none() ? nullptr : grads.ptr();
  if (given != nullptr && (!PyList_Check(given) || PyList_GET_SIZE(given) != PyList_GET_SIZE(list)))
    throw std::invalid_argument("TensorWatch.check: grads must be a list with one entry per parameter");
  // The gradients read, in position order, held until the comparisons are done.
  struct Held {
    std::vector<PyObject*> refs;
    ~Held() {
      for (PyObject* r : refs) Py_DECREF(r);
    }
  } held;
  held.refs.reserve(active_.size());
  bool new_grads = false;
  try {
    // Parameters in place: a `p.data = ...` swap (Module.to() does it) moves the address.
    for (size_t j = 0; j < active_.size(); ++j)
      if (read_ptr(PyList_GET_ITEM(list, active_[j])) != param_ptrs_[j]) return WatchStatus::Changed;
    // The same positions have a gradient (p.grad, or the caller's list standing in for it).
    for (size_t i = 0; i < has_grad_.size(); ++i) {
      PyObject* g = given != nullptr ? new_ref(PyList_GET_ITEM(given, static_cast<Py_ssize_t>(i)))
                                     : grad_of(PyList_GET_ITEM(list, static_cast<Py_ssize_t>(i)));
      if ((g != Py_None) != static_cast<bool>(has_grad_[i])) {
        Py_DECREF(g);
        return WatchStatus::Changed;
      }
      if (g == Py_None)
        Py_DECREF(g);
      else
        held.refs.push_back(g);
    }
    // Each is the object the table was pointed at, still at the same address.
    for (size_t j = 0; j < active_.size(); ++j) {
      PyObject* g = held.refs[rank_[j]];
      if (!refers_to(grad_refs_[j], g) || read_ptr(g) != grad_ptrs_[j]) new_grads = true;
    }
  } catch (const std::exception&) {
    return WatchStatus::Changed;  // an unreadable tensor: the full rebuild names the problem
  }
  if (!new_grads) return WatchStatus::Unchanged;
  if (picked != nullptr)
    for (size_t j = 0; j < active_.size(); ++j) picked->append(py::reinterpret_borrow<py::object>(held.refs[rank_[j]]));
  return WatchStatus::NewGrads;
}

}  // namespace tp
