// tensor_watch.h: the per-step check that a param group still holds the tensors its kernel tables
// point at, done in one native loop instead of several Python passes over a thousand tensors.
//
// Why native: with many small tensors the optimizer step is dominated by this check, and the
// Python objects it touches are cold after the kernel has streamed the tensors' memory; a C loop
// reads them with far fewer instructions in between, so the cache misses overlap.
//
// An address is only worth caching while its storage lives and keeps its size, so the check reads,
// for every parameter and gradient, every step: the data address, the element count, the dtype,
// contiguity and whether the storage still holds offset + extent. A parameter shrunk in place
// (`p.data = p.data[:k]`), a storage resized under a tensor, a gradient moved to another device:
// each is a rebuild (or an error naming the tensor), never a kernel reading past the end.
//
// Tensors stay opaque here: no torch header is included and libtorch is not linked; what is read
// of them comes from tensor_reader.h.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "common/tensor_reader.h"

namespace tp {

// What TensorWatch::check found.
enum class WatchStatus : int {
  Unchanged = 0,  // same gradient objects at the same addresses, parameters in place
  NewGrads = 1,   // same parameters with a gradient, but some gradient tensors are new or moved
  Changed = 2,    // anything else: another set of parameters with a gradient, a parameter changed
};

// The state of one param group as its kernel tables saw it: which positions have a gradient, and
// per active parameter its object, address, element count, dtype and device, its gradient's address
// and a weak reference to that gradient (so a freed gradient is never mistaken for a new one
// allocated at the same place, and the watch never keeps a gradient alive).
class TensorWatch {
 public:
  // `params`: the group's parameters; `active`: positions with a gradient, in table order;
  // `grads`: those gradients, in the same order.
  TensorWatch(const pybind11::list& params, const std::vector<int64_t>& active, const pybind11::list& grads);
  ~TensorWatch();
  TensorWatch(const TensorWatch&) = delete;
  TensorWatch& operator=(const TensorWatch&) = delete;

  // Read every parameter's .grad (or take `grads[i]` when a list is given, None entries meaning
  // "no gradient") and compare with what the tables hold. On NewGrads, `picked` becomes a list of
  // the active gradients in table order and `addrs` their addresses when every one of them fits its
  // table slot (element count, dtype, device, contiguous, in bounds, not a lazy view); `addrs` stays
  // empty when one does not, and the caller's per-tensor checks name it. Otherwise neither is
  // touched: the every-step Unchanged answer builds no Python object.
  WatchStatus check(const pybind11::list& params, const pybind11::object& grads, pybind11::object* picked,
                    std::vector<std::uintptr_t>* addrs) const;
  // After the caller re-pointed the tables at new gradients (same active positions): record them.
  void set_grads(const pybind11::list& grads, const std::vector<std::uintptr_t>& addrs);

 private:
  struct Slot {
    PyObject* param = nullptr;     // owned reference
    std::uintptr_t param_ptr = 0;
    int64_t numel = 0;
    int32_t dtype = -1;
    int32_t device_type = -1, device_index = -1;
    std::uintptr_t grad_ptr = 0;
    PyObject* grad_ref = nullptr;  // owned weak reference
  };
  bool fits(const Slot& s, const TensorFacts& f) const;
  void drop_refs();

  std::vector<uint8_t> has_grad_;  // per position in params
  std::vector<int64_t> active_;    // positions with a gradient, table order
  std::vector<size_t> rank_;       // per active slot: its index among active positions, in position order
  std::vector<Slot> slots_;        // per active slot
};

}  // namespace tp
