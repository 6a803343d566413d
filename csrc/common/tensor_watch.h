// tensor_watch.h: the per-step check that a param group still holds the tensors its kernel tables
// point at, done in one native loop instead of several Python passes over a thousand tensors.
//
// Why native: with many small tensors the optimizer step is dominated by this check, and the
// Python objects it touches are cold after the kernel has streamed the tensors' memory; a C loop
// reads them with far fewer instructions in between, so the cache misses overlap.
//
// Tensors stay opaque here: no torch header is included and libtorch is not linked. A tensor's
// data address is read through the C function torch exports for code built without its headers
// (`torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr`, what inductor's generated
// C code uses), or, where a torch lacks it, by calling `Tensor.data_ptr`.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace tp {

// Install how addresses are read: `fn_addr` is the address of torch's exported reader (0 if torch
// has none), `fallback` a Python callable tensor -> int used when it is 0.
void set_data_ptr_reader(std::uintptr_t fn_addr, pybind11::object fallback);

// The data address of each tensor in `tensors` (they must be dense tensors).
std::vector<std::uintptr_t> data_ptrs(const pybind11::list& tensors);

// What TensorWatch::check found.
enum class WatchStatus : int {
  Unchanged = 0,  // same gradient objects at the same addresses, parameters in place
  NewGrads = 1,   // same parameters with a gradient, but some gradient tensors are new or moved
  Changed = 2,    // anything else: another set of parameters with a gradient, a parameter moved
};

// The state of one param group as its kernel tables saw it: which positions have a gradient, the
// addresses of the active parameters and gradients, and weak references to those gradients (so a
// freed gradient is never mistaken for a new one allocated at the same place, and the watch
// never keeps a gradient alive).
class TensorWatch {
 public:
  // `params`: the group's parameters; `active`: positions with a gradient, in table order;
  // `grads`: those gradients, in the same order.
  TensorWatch(const pybind11::list& params, const std::vector<int64_t>& active, const pybind11::list& grads);
  ~TensorWatch();
  TensorWatch(const TensorWatch&) = delete;
  TensorWatch& operator=(const TensorWatch&) = delete;

  // Read every parameter's .grad (or take `grads[i]` when a list is given, None entries meaning
  // "no gradient") and compare with what the tables hold. On NewGrads, `picked` (if given) receives
  // the active gradients in table order, ready for the caller's checks and set_grads.
  WatchStatus check(const pybind11::list& params, const pybind11::object& grads, pybind11::list* picked) const;
  // After the caller re-pointed the tables at new gradients (same active positions): record them.
  void set_grads(const pybind11::list& grads, const std::vector<std::uintptr_t>& addrs);

 private:
  void drop_refs();

  std::vector<uint8_t> has_grad_;      // per position in params
  std::vector<int64_t> active_;        // positions with a gradient, table order
  std::vector<size_t> rank_;           // per active slot: its index among active positions, in position order
  std::vector<std::uintptr_t> param_ptrs_;
  std::vector<std::uintptr_t> grad_ptrs_;
  std::vector<PyObject*> grad_refs_;   // owned weak references, one per active gradient
};

}  // namespace tp
