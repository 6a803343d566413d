// tensor_watch.cpp: see tensor_watch.h. Every function here runs with the GIL held: it reads
// Python objects and tensor metadata, compares them and writes the tables' gradient row; no tensor
// memory is touched.
#include "common/tensor_watch.h"

#include <stdexcept>
#include <string>

#include "common/params.h"

namespace py = pybind11;

namespace tp {
namespace {

PyObject* grad_name() {
  static PyObject* name = PyUnicode_InternFromString("grad");  // immortal for the process
  return name;
}

}  // namespace

PyObject* TensorWatch::GradReader::read(PyObject* p) {
  PyTypeObject* tp = Py_TYPE(p);
  if (tp != type || !(tp->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) || tp->tp_version_tag != tag) {
    type = tp;
    get = nullptr;
    // Only where attribute lookup is Python's generic one: there a data descriptor on the type is
    // what p.grad calls, whatever p's __dict__ holds.
    PyObject* d = tp->tp_getattro == PyObject_GenericGetAttr ? _PyType_Lookup(tp, grad_name()) : nullptr;
    tag = tp->tp_version_tag;  // read after the lookup, which assigns one if the type had none
    if (d != nullptr && Py_IS_TYPE(d, &PyGetSetDescr_Type) && (tp->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)) {
      get = reinterpret_cast<PyGetSetDescrObject*>(d)->d_getset->get;
      closure = reinterpret_cast<PyGetSetDescrObject*>(d)->d_getset->closure;
    }
  }
  PyObject* g = get != nullptr ? get(p, closure) : PyObject_GetAttr(p, grad_name());
  if (g == nullptr) throw py::error_already_set();
  return g;
}

PyObject* TensorWatch::gradient_at(PyObject* params, PyObject* given, Py_ssize_t i) {
  if (given == nullptr) return grad_reader_.read(PyList_GET_ITEM(params, i));
  PyObject* g = PyList_GET_ITEM(given, i);
  Py_INCREF(g);
  return g;
}

TensorWatch::TensorWatch(const py::list& params, const std::vector<int64_t>& active, const py::list& grads,
                         const py::list& rows) {
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  if (static_cast<size_t>(PyList_GET_SIZE(grads.ptr())) != active.size())
    throw std::invalid_argument("TensorWatch: one gradient per active position is needed");
  has_grad_.assign(static_cast<size_t>(n), 0);
  slots_.reserve(active.size());
  try {
    for (int64_t i : active) {
      if (i < 0 || i >= n) throw std::invalid_argument("TensorWatch: active position out of range");
      if (has_grad_[static_cast<size_t>(i)]) throw std::invalid_argument("TensorWatch: active position repeated");
      has_grad_[static_cast<size_t>(i)] = 1;
      PyObject* p = PyList_GET_ITEM(params.ptr(), i);
      TensorFacts f;
      TensorPlace pl;
      if (!read_all(p, &f, &pl) || !f.contiguous || !f.in_bounds)
        throw std::invalid_argument("TensorWatch: the parameter at position " + std::to_string(i) +
                                    " is not a contiguous tensor held by its storage");
      Slot s;
      Py_INCREF(p);
      s.param = p;
      s.position = i;
      s.param_ptr = f.ptr;
      s.numel = f.numel;
      s.dtype = f.dtype;
      s.device_type = pl.device_type;
      s.device_index = pl.device_index;
      slots_.push_back(s);
    }
    for (Py_ssize_t i = 0; i < n; ++i)
      if (!has_grad_[static_cast<size_t>(i)]) inactive_.push_back(i);
    // The tables' gradient cells, slot by slot: table b holds the next n_b slots in its row kGrad.
    size_t k = 0;
    for (py::handle r : rows) {
      TensorFacts f;
      TensorPlace pl;
      if (!read_all(r.ptr(), &f, &pl) || f.dtype != 4 /* int64 */ || !f.contiguous || !f.in_bounds ||
          pl.device_type != 0 /* cpu */ || pl.lazy || f.numel % kRows != 0)
        throw std::invalid_argument("TensorWatch: rows must be contiguous int64 CPU tensors of [kRows][n]");
      const int64_t nb = f.numel / kRows;
      if (k + static_cast<size_t>(nb) > slots_.size())
        throw std::invalid_argument("TensorWatch: the tables hold more entries than there are active positions");
      int64_t* grad_row = reinterpret_cast<int64_t*>(f.ptr) + kGrad * nb;
      for (int64_t c = 0; c < nb; ++c) slots_[k++].cell = grad_row + c;
      rows_.push_back(r.inc_ref().ptr());
    }
    if (k != slots_.size())
      throw std::invalid_argument("TensorWatch: the tables hold fewer entries than there are active positions");
    for (size_t j = 0; j < slots_.size(); ++j) {
      TensorFacts f;
      if (!read_facts(PyList_GET_ITEM(grads.ptr(), static_cast<Py_ssize_t>(j)), &f) ||
          static_cast<std::uintptr_t>(*slots_[j].cell) != f.ptr)
        throw std::invalid_argument("TensorWatch: the tables do not hold the given gradients");
    }
    addrs_.resize(slots_.size());
  } catch (...) {
    drop_refs();
    throw;
  }
}

TensorWatch::~TensorWatch() { drop_refs(); }

void TensorWatch::drop_refs() {
  for (Slot& s : slots_) Py_CLEAR(s.param);
  for (PyObject*& r : rows_) Py_CLEAR(r);
}

bool TensorWatch::fits(const Slot& s, const TensorFacts& f) const {
  return f.numel == s.numel && f.dtype == s.dtype && f.contiguous && f.in_bounds;
}

WatchStatus TensorWatch::refresh(const py::list& params, const py::object& grads) {
  PyObject* list = params.ptr();
  if (static_cast<size_t>(PyList_GET_SIZE(list)) != has_grad_.size()) return WatchStatus::Changed;
  PyObject* given = grads.is_none() ? nullptr : grads.ptr();
  if (given != nullptr && (!PyList_Check(given) || PyList_GET_SIZE(given) != PyList_GET_SIZE(list)))
    throw std::invalid_argument("TensorWatch.refresh: grads must be a list with one entry per parameter");
  bool moved = false;
  try {
    for (size_t j = 0; j < slots_.size(); ++j) {
      const Slot& s = slots_[j];
      // The parameter in place and unchanged: the same object, address, size and storage bounds (a
      // `p.data = ...` swap, Module.to(), a resize of the storage all show here).
      PyObject* p = PyList_GET_ITEM(list, static_cast<Py_ssize_t>(s.position));
      TensorFacts f;
      if (p != s.param || !read_facts_of_known(p, &f) || f.ptr != s.param_ptr || !fits(s, f))
        return WatchStatus::Changed;
      // Its gradient, whichever object it is: one that fits the slot, on the parameter's device, not
      // a lazy view. Its address is used once refresh returns, while the parameter (or the caller's
      // list) still holds it.
      PyObject* g = gradient_at(list, given, static_cast<Py_ssize_t>(s.position));
      TensorPlace pl;
      const bool ok = g != Py_None && read_all(g, &f, &pl) && fits(s, f) && !pl.lazy &&
                      pl.device_type == s.device_type && pl.device_index == s.device_index;
      Py_DECREF(g);
      if (!ok) return WatchStatus::Changed;
      addrs_[j] = f.ptr;
      moved |= f.ptr != static_cast<std::uintptr_t>(*s.cell);
    }
    // The positions without a gradient still have none.
    for (int64_t i : inactive_) {
      PyObject* g = gradient_at(list, given, static_cast<Py_ssize_t>(i));
      const bool none = g == Py_None;
      Py_DECREF(g);
      if (!none) return WatchStatus::Changed;
    }
  } catch (const std::exception&) {
    return WatchStatus::Changed;  // an unreadable tensor: the full rebuild names the problem
  }
  if (!moved) return WatchStatus::Unchanged;
  for (size_t j = 0; j < slots_.size(); ++j) *slots_[j].cell = static_cast<int64_t>(addrs_[j]);
  return WatchStatus::NewGrads;
}

}  // namespace tp
