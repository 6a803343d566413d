// tensor_watch.cpp: see tensor_watch.h. Every function here runs with the GIL held: it reads
// Python objects and tensor metadata and compares them; no tensor memory is touched.
#include "common/tensor_watch.h"

#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace tp {
namespace {

bool refers_to(PyObject* ref, PyObject* obj) {  // whether a weak reference still points at obj
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

PyObject* grad_of(PyObject* p) {  // p.grad as a new reference; throws on a failing read
  static PyObject* name = PyUnicode_InternFromString("grad");  // immortal for the process
  PyObject* g = PyObject_GetAttr(p, name);
  if (g == nullptr) throw py::error_already_set();
  return g;
}

}  // namespace

TensorWatch::TensorWatch(const py::list& params, const std::vector<int64_t>& active, const py::list& grads)
    : active_(active) {
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
      if (!read_facts(p, &f) || !read_place(p, &pl) || !f.contiguous || !f.in_bounds)
        throw std::invalid_argument("TensorWatch: the parameter at position " + std::to_string(i) +
                                    " is not a contiguous tensor held by its storage");
      Slot s;
      Py_INCREF(p);
      s.param = p;
      s.param_ptr = f.ptr;
      s.numel = f.numel;
      s.dtype = f.dtype;
      s.device_type = pl.device_type;
      s.device_index = pl.device_index;
      slots_.push_back(s);
    }
    // rank_[j]: how many active positions come before active_[j], i.e. its index in position order.
    std::vector<size_t> rank_of_position(static_cast<size_t>(n), 0);
    for (size_t s = 0, r = 0; s < has_grad_.size(); ++s)
      if (has_grad_[s]) rank_of_position[s] = r++;
    for (int64_t i : active) rank_.push_back(rank_of_position[static_cast<size_t>(i)]);
    set_grads(grads, data_ptrs(grads));
  } catch (...) {
    drop_refs();
    throw;
  }
}

TensorWatch::~TensorWatch() { drop_refs(); }

void TensorWatch::drop_refs() {
  for (Slot& s : slots_) {
    Py_CLEAR(s.param);
    Py_CLEAR(s.grad_ref);
  }
}

bool TensorWatch::fits(const Slot& s, const TensorFacts& f) const {
  return f.numel == s.numel && f.dtype == s.dtype && f.contiguous && f.in_bounds;
}

void TensorWatch::set_grads(const py::list& grads, const std::vector<std::uintptr_t>& addrs) {
  const size_t n = static_cast<size_t>(PyList_GET_SIZE(grads.ptr()));
  if (n != slots_.size() || addrs.size() != n)
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
  for (size_t k = 0; k < n; ++k) {
    Py_XDECREF(slots_[k].grad_ref);
    slots_[k].grad_ref = refs[k];
    slots_[k].grad_ptr = addrs[k];
  }
}

WatchStatus TensorWatch::check(const py::list& params, const py::object& grads, py::object* picked,
                               std::vector<std::uintptr_t>* addrs) const {
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
  held.refs.reserve(slots_.size());
  struct Seen {
    TensorFacts facts;
    bool fits = false;  // readable, and matches its parameter's slot
    bool moved = false;  // another object, or another address, than the table holds
  };
  std::vector<Seen> seen(slots_.size());
  bool new_grads = false;
  try {
    // Parameters in place and unchanged: the same objects, addresses, sizes and storage bounds (a
    // `p.data = ...` swap, Module.to(), a resize of the storage all show here).
    for (size_t j = 0; j < slots_.size(); ++j) {
      const Slot& s = slots_[j];
      PyObject* p = PyList_GET_ITEM(list, active_[j]);
      TensorFacts f;
      if (p != s.param || !read_facts_of_known(p, &f) || f.ptr != s.param_ptr || !fits(s, f))
        return WatchStatus::Changed;
    }
    // The same positions have a gradient (p.grad, or the caller's list standing in for it).
    for (size_t i = 0; i < has_grad_.size(); ++i) {
      PyObject* g = given != nullptr ? PyList_GET_ITEM(given, static_cast<Py_ssize_t>(i))
                                     : grad_of(PyList_GET_ITEM(list, static_cast<Py_ssize_t>(i)));
      if (given != nullptr) Py_INCREF(g);
      if ((g != Py_None) != static_cast<bool>(has_grad_[i])) {
        Py_DECREF(g);
        return WatchStatus::Changed;
      }
      if (g == Py_None)
        Py_DECREF(g);
      else
        held.refs.push_back(g);
    }
    // Each is the object the table was pointed at, still at the same address and still fitting.
    for (size_t j = 0; j < slots_.size(); ++j) {
      PyObject* g = held.refs[rank_[j]];
      Seen& e = seen[j];
      const bool same = refers_to(slots_[j].grad_ref, g);  // the object read when the table was pointed at it
      e.fits = (same ? read_facts_of_known(g, &e.facts) : read_facts(g, &e.facts)) && fits(slots_[j], e.facts);
      e.moved = !same || !e.fits || e.facts.ptr != slots_[j].grad_ptr;
      new_grads |= e.moved;
    }
  } catch (const std::exception&) {
    return WatchStatus::Changed;  // an unreadable tensor: the full rebuild names the problem
  }
  if (!new_grads) return WatchStatus::Unchanged;
  // New gradients join the table only if each fits its slot, lives on its parameter's device and is
  // not a lazy view; otherwise `addrs` stays empty and the caller's per-tensor checks speak.
  bool all_fit = true;
  for (size_t j = 0; j < slots_.size() && all_fit; ++j) {
    const Seen& e = seen[j];
    TensorPlace pl;
    all_fit = e.fits && (!e.moved || (read_place(held.refs[rank_[j]], &pl) && !pl.lazy &&
                                      pl.device_type == slots_[j].device_type &&
                                      pl.device_index == slots_[j].device_index));
  }
  py::list out(slots_.size());
  for (size_t j = 0; j < slots_.size(); ++j) {
    PyObject* g = held.refs[rank_[j]];
    Py_INCREF(g);
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(j), g);  // steals the new reference
    if (all_fit) addrs->push_back(seen[j].facts.ptr);
  }
  *picked = std::move(out);
  return WatchStatus::NewGrads;
}

}  // namespace tp
