// tensor_watch.h: the per-step check that a param group still holds the tensors its kernel tables
// point at, and the refresh of the tables' gradient addresses when backward made new gradient
// tensors, done in one native loop instead of several Python passes over a thousand tensors.
//
// Why native: with many small tensors the optimizer step is dominated by this check, and the
// Python objects it touches are cold after the kernel has streamed the tensors' memory; a C loop
// reads them with far fewer instructions in between, so the cache misses overlap.
//
// An address is only worth caching while its storage lives and keeps its size, so the check reads,
// for every parameter, every step: the data address, the element count, the dtype, contiguity and
// whether the storage still holds offset + extent; for every gradient also its device and whether
// it is a lazy view. A gradient is judged by what it is, not by which object it is: no reference to
// it is kept (a gradient freed by zero_grad() is freed at once, as with torch's optimizers), and a
// new gradient costs what an unchanged one costs, which is what makes the default training loop
// (zero_grad(set_to_none=True) + backward: new gradient tensors every step) as fast as persistent
// gradients. A parameter shrunk in place (`p.data = p.data[:k]`), a storage resized under a tensor,
// a gradient moved to another device: each is a rebuild (or an error naming the tensor), never a
// kernel reading past the end.
//
// Tensors stay opaque here: no torch header is included and libtorch is not linked; what is read
// of them comes from tensor_reader.h.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "common/tensor_reader.h"

namespace tp {

// What TensorWatch::refresh found.
enum class WatchStatus : int {
  Unchanged = 0,  // the tables are valid as they are (new gradient tensors at the addresses the tables
                  // hold included: the allocator often hands back the same blocks)
  NewGrads = 1,   // gradients at other addresses fit their slots: the tables' host rows now hold them
                  // (copies of the rows on a device must be uploaded again)
  Changed = 2,    // anything else, nothing written: another set of parameters with a gradient, a
                  // parameter changed, or a new gradient that does not fit its slot (element count,
                  // dtype, device, contiguity, bounds, lazy view), which the rebuild's checks name
};

// The state of one param group as its kernel tables saw it: which positions have a gradient, and
// per active parameter its object, address, element count, dtype and device, and the table cell
// that holds its gradient's address.
class TensorWatch {
 public:
  // `params`: the group's parameters; `active`: positions with a gradient, in table order;
  // `grads`: those gradients, in the same order; `rows`: the host rows of the tables (int64
  // tensors laid out [kRows][n], params.h), in table order, their n adding up to len(active). The
  // watch holds them: it rewrites their gradient row.
  TensorWatch(const pybind11::list& params, const std::vector<int64_t>& active, const pybind11::list& grads,
              const pybind11::list& rows);
  ~TensorWatch();
  TensorWatch(const TensorWatch&) = delete;
  TensorWatch& operator=(const TensorWatch&) = delete;

  // Read every parameter's .grad (or take `grads[i]` when a list is given, None entries meaning
  // "no gradient"), compare with the record and, when only gradient addresses changed and each
  // gradient fits its slot, write them into the tables. All or nothing: after Changed, the tables
  // were not touched.
  WatchStatus refresh(const pybind11::list& params, const pybind11::object& grads);

 private:
  struct Slot {
    PyObject* param = nullptr;  // owned reference
    int64_t position = 0;       // in params
    std::uintptr_t param_ptr = 0;
    int64_t numel = 0;
    int32_t dtype = -1;
    int32_t device_type = -1, device_index = -1;
    int64_t* cell = nullptr;  // the table's entry for the gradient's address
  };
  // p.grad as a new reference (throws when the read fails). Python's attribute lookup walks the
  // tensor type's bases, whose dictionaries are cold after a kernel pass: this calls the getter
  // the lookup would find, cached while the type (and its version tag) stays the same.
  struct GradReader {
    PyTypeObject* type = nullptr;  // borrowed: compared, never dereferenced once replaced
    unsigned int tag = 0;
    getter get = nullptr;
    void* closure = nullptr;
    PyObject* read(PyObject* p);
  };
  // The gradient of position i as a new reference: the caller's list entry, or p.grad.
  PyObject* gradient_at(PyObject* params, PyObject* given, Py_ssize_t i);
  bool fits(const Slot& s, const TensorFacts& f) const;
  void drop_refs();

  std::vector<uint8_t> has_grad_;  // per position in params
  std::vector<int64_t> inactive_;  // positions without a gradient
  std::vector<Slot> slots_;        // per active position, table order
  std::vector<std::uintptr_t> addrs_;  // refresh's scratch: the gradients' addresses, per slot
  std::vector<PyObject*> rows_;    // owned references to the tables' host rows
  GradReader grad_reader_;
};

}  // namespace tp
