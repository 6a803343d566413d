// tensor_reader.h: what the per-step checks read of a tensor (data address, element count, dtype,
// contiguity, storage bounds, device, lazy-view bit) from its Python object, without torch headers
// and without linking libtorch.
//
// The reader calls the C functions torch exports for code built without its headers (AOTInductor's
// shim: `aoti_torch_get_numel` and friends, whose addresses Python looks up). They take an
// `at::Tensor*`; a tensor's Python object holds its at::Tensor at a fixed offset, which
// set_tensor_reader finds by comparing sample objects with handles torch made for them, and
// verifies against the Python-level values before using it. Where any of that is missing, the
// reader calls a Python function instead (same answers, slower).
//
// Whether a tensor is a lazy (negated or conjugated) view has no C function: it is one bit of the
// dispatch key set its TensorImpl holds. set_tensor_reader finds that word by comparing the sample
// tensors' TensorImpls with the key sets Python reports for them (a 64-bit value found at the same
// offset in every sample), and the bit is then verified like the rest; without it the reader asks
// Python (`Tensor.is_neg`, ~60 ns a tensor: the price of every new gradient without the bit).
//
// Header-only: one small state shared by the optimizers' TensorWatch and the bindings' helpers.
// Every function runs with the GIL held and reads metadata only, never tensor memory. A loader or
// kernel thread never calls it: tensors are read before work is handed to them.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace tp {

// What the per-step check needs to know of a tensor.
struct TensorFacts {
  std::uintptr_t ptr = 0;  // address of the first element (0 for an empty tensor)
  int64_t numel = 0;
  int32_t dtype = -1;      // torch's ScalarType code
  bool contiguous = false;
  bool in_bounds = false;  // its storage holds (storage offset + numel) elements
};

// Where a tensor lives, and whether it is a lazy view (negated or conjugated) whose memory does not
// hold its values: read only when a tensor is new to a table.
struct TensorPlace {
  int32_t device_type = -1;
  int32_t device_index = -1;
  bool lazy = true;
};

namespace detail {

// The aoti_torch_* functions used (torch/csrc/inductor/aoti_torch/c/shim.h). Each takes an
// at::Tensor* and returns 0 on success; a failure (a tensor without storage, say) is a nonzero
// code, never an exception crossing into this module.
struct Aoti {
  int32_t (*data_ptr)(void*, void**) = nullptr;
  int32_t (*numel)(void*, int64_t*) = nullptr;
  int32_t (*storage_size)(void*, int64_t*) = nullptr;    // bytes
  int32_t (*storage_offset)(void*, int64_t*) = nullptr;  // elements
  int32_t (*dtype)(void*, int32_t*) = nullptr;
  int32_t (*dim)(void*, int64_t*) = nullptr;
  int32_t (*sizes)(void*, int64_t**) = nullptr;
  int32_t (*strides)(void*, int64_t**) = nullptr;
  int32_t (*device_type)(void*, int32_t*) = nullptr;
  int32_t (*device_index)(void*, int32_t*) = nullptr;
  int32_t (*is_contiguous)(void*, bool*) = nullptr;  // torch >= 2.9 only: else from sizes and strides
  int32_t (*delete_tensor)(void*) = nullptr;
};

struct Reader {
  Aoti fn;
  Py_ssize_t offset = -1;               // of the at::Tensor in a tensor object; -1: Python fallback
  PyTypeObject* tensor_type = nullptr;  // owned
  PyObject* fallback = nullptr;         // owned
  PyObject* is_neg = nullptr;           // owned
  Py_ssize_t keys_offset = -1;          // of the dispatch key set in a TensorImpl; -1: ask is_neg
  uint64_t lazy_keys = 0;               // its Negative and Conjugate bits
};
inline Reader g_reader;  // installed by set_tensor_reader; used with the GIL held

// Bytes per element of a ScalarType code; -1 for types no table holds.
inline int64_t item_size(int32_t code) {
  switch (code) {
    case 0: case 1: case 11: return 1;  // uint8, int8, bool
    case 2: case 5: case 15: return 2;  // int16, float16, bfloat16
    case 3: case 6: return 4;           // int32, float32
    case 4: case 7: case 9: return 8;   // int64, float64, complex64
    case 10: return 16;                 // complex128
    default: return -1;
  }
}

// The at::Tensor inside `t`, or null when `t` is not a tensor object.
inline void* handle_of(PyObject* t) {
  const Reader& r = g_reader;
  if (!PyObject_TypeCheck(t, r.tensor_type)) return nullptr;
  if (Py_TYPE(t)->tp_basicsize < r.offset + static_cast<Py_ssize_t>(sizeof(void*))) return nullptr;
  void* h = reinterpret_cast<char*>(t) + r.offset;
  return *static_cast<void**>(h) != nullptr ? h : nullptr;
}

inline bool contiguous_of(void* h, int64_t numel, bool* out) {
  const Aoti& a = g_reader.fn;
  if (a.is_contiguous != nullptr) return a.is_contiguous(h, out) == 0;
  int64_t dim = 0;
  int64_t* sizes = nullptr;
  int64_t* strides = nullptr;
  if (a.dim(h, &dim) || a.sizes(h, &sizes) || a.strides(h, &strides)) return false;
  // torch's rule: an empty tensor is contiguous; size-1 dimensions may have any stride.
  bool c = true;
  int64_t expected = 1;
  for (int64_t d = dim - 1; d >= 0 && numel != 0; --d) {
    if (sizes[d] == 1) continue;
    if (strides[d] != expected) {
      c = false;
      break;
    }
    expected *= sizes[d];
  }
  *out = c;
  return true;
}

inline bool fast_facts(void* h, TensorFacts* f) {
  const Aoti& a = g_reader.fn;
  void* data = nullptr;
  int64_t numel = 0, storage_bytes = 0, offset = 0;
  int32_t dtype = -1;
  bool contiguous = false;
  if (a.data_ptr(h, &data) || a.numel(h, &numel) || a.storage_size(h, &storage_bytes) ||
      a.storage_offset(h, &offset) || a.dtype(h, &dtype) || !contiguous_of(h, numel, &contiguous))
    return false;
  const int64_t item = item_size(dtype);
  f->ptr = reinterpret_cast<std::uintptr_t>(data);
  f->numel = numel;
  f->dtype = dtype;
  f->contiguous = contiguous;
  // Elements that fit in the storage, counted by division so that nothing overflows.
  f->in_bounds = numel == 0 || (item > 0 && offset >= 0 && numel <= storage_bytes / item - offset);
  return true;
}

// The 64-bit word at `offset` bytes into the TensorImpl behind handle `h`.
inline uint64_t impl_word(void* h, Py_ssize_t offset) {
  uint64_t w;
  std::memcpy(&w, *static_cast<char**>(h) + offset, sizeof w);
  return w;
}

// Without the key set word: real dtypes never carry the conjugate bit (torch refuses it), and
// complex ones never fit a table, so the negation bit is the one lazy view to ask Python about.
inline bool fast_place(PyObject* t, void* h, TensorPlace* p) {
  const Reader& reader = g_reader;
  const Aoti& a = reader.fn;
  if (a.device_type(h, &p->device_type) || a.device_index(h, &p->device_index)) return false;
  if (reader.keys_offset >= 0) {
    p->lazy = (impl_word(h, reader.keys_offset) & reader.lazy_keys) != 0;
    return true;
  }
  PyObject* r = PyObject_CallOneArg(reader.is_neg, t);
  if (r == nullptr) {
    PyErr_Clear();
    return false;
  }
  p->lazy = r != Py_False;
  Py_DECREF(r);
  return true;
}

// The Python fallback: fallback(t) -> (ptr, numel, dtype, contiguous, in_bounds, device_type,
// device_index, lazy).
inline bool fallback_read(PyObject* t, TensorFacts* f, TensorPlace* p) {
  if (g_reader.fallback == nullptr) return false;
  PyObject* r = PyObject_CallOneArg(g_reader.fallback, t);
  if (r == nullptr) {
    PyErr_Clear();
    return false;
  }
  bool ok = PyTuple_Check(r) && PyTuple_GET_SIZE(r) == 8;
  if (ok) {
    auto item = [&](int i) { return PyTuple_GET_ITEM(r, i); };
    TensorFacts tf;
    TensorPlace tp_;
    tf.ptr = static_cast<std::uintptr_t>(PyLong_AsUnsignedLongLong(item(0)));
    tf.numel = PyLong_AsLongLong(item(1));
    tf.dtype = static_cast<int32_t>(PyLong_AsLong(item(2)));
    tf.contiguous = PyObject_IsTrue(item(3)) == 1;
    tf.in_bounds = PyObject_IsTrue(item(4)) == 1;
    tp_.device_type = static_cast<int32_t>(PyLong_AsLong(item(5)));
    tp_.device_index = static_cast<int32_t>(PyLong_AsLong(item(6)));
    tp_.lazy = PyObject_IsTrue(item(7)) != 0;
    ok = PyErr_Occurred() == nullptr;
    if (ok && f != nullptr) *f = tf;
    if (ok && p != nullptr) *p = tp_;
  }
  Py_DECREF(r);
  if (!ok) PyErr_Clear();
  return ok;
}

// Where the at::Tensor sits in a tensor object: the first pointer-aligned offset past the object
// header at which every sample holds the TensorImpl pointer of the handle torch made for it.
inline Py_ssize_t locate(const pybind11::list& samples, const pybind11::list& handles) {
  const Py_ssize_t n = PyList_GET_SIZE(samples.ptr());
  if (n == 0 || PyList_GET_SIZE(handles.ptr()) != n) return -1;
  for (Py_ssize_t off = sizeof(PyObject); off <= static_cast<Py_ssize_t>(sizeof(PyObject)) + 64;
       off += sizeof(void*)) {
    bool all = true;
    for (Py_ssize_t i = 0; i < n && all; ++i) {
      PyObject* obj = PyList_GET_ITEM(samples.ptr(), i);
      void* h = PyCapsule_GetPointer(PyList_GET_ITEM(handles.ptr(), i), nullptr);
      if (h == nullptr) {
        PyErr_Clear();
        return -1;
      }
      all = PyObject_TypeCheck(obj, g_reader.tensor_type) &&
            Py_TYPE(obj)->tp_basicsize >= off + static_cast<Py_ssize_t>(sizeof(void*)) &&
            *static_cast<void**>(h) != nullptr &&
            *reinterpret_cast<void**>(reinterpret_cast<char*>(obj) + off) == *static_cast<void**>(h);
    }
    if (all) return off;
  }
  return -1;
}

// Where the dispatch key set sits in a TensorImpl: the first 8-byte offset within its first
// kImplScanBytes (sizeof(TensorImpl) is 176-192 bytes in torch 2.x) at which every sample with a
// known key set holds exactly that value; -1 when there is none or fewer than two samples to agree.
constexpr Py_ssize_t kImplScanBytes = 192;
inline Py_ssize_t locate_keys(const pybind11::list& samples, const pybind11::list& key_sets) {
  const Py_ssize_t n = PyList_GET_SIZE(samples.ptr());
  if (PyList_GET_SIZE(key_sets.ptr()) != n) return -1;
  for (Py_ssize_t off = 0; off < kImplScanBytes; off += sizeof(uint64_t)) {
    Py_ssize_t agree = 0;
    bool all = true;
    for (Py_ssize_t i = 0; i < n && all; ++i) {
      PyObject* key = PyList_GET_ITEM(key_sets.ptr(), i);
      if (key == Py_None) continue;
      void* h = handle_of(PyList_GET_ITEM(samples.ptr(), i));
      const uint64_t want = PyLong_AsUnsignedLongLong(key);
      if (PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
      }
      all = h != nullptr && impl_word(h, off) == want;
      agree += all;
    }
    if (all && agree >= 2) return off;
  }
  return -1;
}

// The native reader agrees with the Python one on every sample.
inline bool verified(const pybind11::list& samples) {
  for (pybind11::handle s : samples) {
    TensorFacts a, b;
    TensorPlace pa, pb;
    void* h = handle_of(s.ptr());
    if (h == nullptr || !fast_facts(h, &a) || !fast_place(s.ptr(), h, &pa) || !fallback_read(s.ptr(), &b, &pb))
      return false;
    if (a.ptr != b.ptr || a.numel != b.numel || a.dtype != b.dtype || a.contiguous != b.contiguous ||
        a.in_bounds != b.in_bounds || pa.device_type != pb.device_type || pa.device_index != pb.device_index ||
        pa.lazy != pb.lazy)
      return false;
  }
  return true;
}

inline void replace(PyObject** slot, PyObject* value) {
  PyObject* old = *slot;
  Py_XINCREF(value);
  *slot = value;
  Py_XDECREF(old);
}

}  // namespace detail

// Install the reader. `functions`: name -> address of the aoti_torch_* functions found (empty: use
// `fallback` only); `samples`/`handles`: tensors and at::Tensor handles torch allocated for them
// (freed here), to locate the at::Tensor inside a tensor object; `tensor_type`: torch's C
// tensor base class; `fallback(t)` -> (ptr, numel, dtype, contiguous, in_bounds, device_type,
// device_index, lazy); `is_neg(t)` -> bool; `key_sets`: per sample the raw value of its dispatch
// key set, or None; `lazy_keys`: the Negative and Conjugate bits of such a value. Returns whether
// the native reader is in use.
inline bool set_tensor_reader(const pybind11::dict& functions, const pybind11::list& samples,
                              const pybind11::list& handles, const pybind11::object& tensor_type,
                              const pybind11::object& fallback, const pybind11::object& is_neg,
                              const pybind11::list& key_sets, uint64_t lazy_keys) {
  if (!PyType_Check(tensor_type.ptr())) throw std::invalid_argument("set_tensor_reader: tensor_type must be a type");
  detail::Reader& r = detail::g_reader;
  r.offset = -1;  // the Python fallback until the native reader is complete and verified
  r.keys_offset = -1;
  r.lazy_keys = lazy_keys;
  detail::replace(reinterpret_cast<PyObject**>(&r.tensor_type), tensor_type.ptr());
  detail::replace(&r.fallback, fallback.is_none() ? nullptr : fallback.ptr());
  detail::replace(&r.is_neg, is_neg.ptr());
  detail::Aoti a;
  // Function pointers stored through void* (POSIX guarantees the round trip).
  const std::pair<const char*, void**> slots[] = {
      {"data_ptr", reinterpret_cast<void**>(&a.data_ptr)}, {"numel", reinterpret_cast<void**>(&a.numel)},
      {"storage_size", reinterpret_cast<void**>(&a.storage_size)},
      {"storage_offset", reinterpret_cast<void**>(&a.storage_offset)}, {"dtype", reinterpret_cast<void**>(&a.dtype)},
      {"dim", reinterpret_cast<void**>(&a.dim)}, {"sizes", reinterpret_cast<void**>(&a.sizes)},
      {"strides", reinterpret_cast<void**>(&a.strides)}, {"device_type", reinterpret_cast<void**>(&a.device_type)},
      {"device_index", reinterpret_cast<void**>(&a.device_index)},
      {"is_contiguous", reinterpret_cast<void**>(&a.is_contiguous)},
      {"delete_tensor_object", reinterpret_cast<void**>(&a.delete_tensor)}};
  for (const auto& [name, slot] : slots)
    *slot = functions.contains(name) ? reinterpret_cast<void*>(functions[name].cast<std::uintptr_t>()) : nullptr;
  r.fn = a;
  const bool complete = a.data_ptr && a.numel && a.storage_size && a.storage_offset && a.dtype && a.device_type &&
                        a.device_index && (a.is_contiguous || (a.dim && a.sizes && a.strides));
  r.offset = complete ? detail::locate(samples, handles) : -1;
  if (a.delete_tensor != nullptr)
    for (pybind11::handle cap : handles) {
      void* h = PyCapsule_GetPointer(cap.ptr(), nullptr);
      if (h != nullptr)
        a.delete_tensor(h);
      else
        PyErr_Clear();
    }
  if (r.offset >= 0 && lazy_keys != 0) r.keys_offset = detail::locate_keys(samples, key_sets);
  if (r.offset >= 0 && !detail::verified(samples)) r.offset = r.keys_offset = -1;
  return r.offset >= 0;
}

// Whether the native reader is installed (else reads go through the Python fallback).
inline bool native_reader_in_use() { return detail::g_reader.offset >= 0; }

// Whether the lazy-view bits are read from the dispatch key set (else through Tensor.is_neg).
inline bool lazy_bits_in_use() { return detail::g_reader.offset >= 0 && detail::g_reader.keys_offset >= 0; }

// False (Python error cleared) when `t` is not a tensor whose facts can be read.
inline bool read_facts(PyObject* t, TensorFacts* out) {
  if (detail::g_reader.offset < 0) return detail::fallback_read(t, out, nullptr);
  void* h = detail::handle_of(t);
  return h != nullptr && detail::fast_facts(h, out);
}

// read_facts for an object this reader has read before (the same object, by identity): its type
// was checked then and a Python object cannot change to a type of another layout, so the handle is
// taken without the type checks.
inline bool read_facts_of_known(PyObject* t, TensorFacts* out) {
  if (detail::g_reader.offset < 0) return detail::fallback_read(t, out, nullptr);
  void* h = reinterpret_cast<char*>(t) + detail::g_reader.offset;
  return *static_cast<void**>(h) != nullptr && detail::fast_facts(h, out);
}

// read_facts and read_place at once: what a tensor new to a table is checked for.
inline bool read_all(PyObject* t, TensorFacts* facts, TensorPlace* place) {
  if (detail::g_reader.offset < 0) return detail::fallback_read(t, facts, place);
  void* h = detail::handle_of(t);
  return h != nullptr && detail::fast_facts(h, facts) && detail::fast_place(t, h, place);
}

inline bool read_place(PyObject* t, TensorPlace* out) {
  if (detail::g_reader.offset < 0) return detail::fallback_read(t, nullptr, out);
  void* h = detail::handle_of(t);
  return h != nullptr && detail::fast_place(t, h, out);
}

// The data address of each tensor in `tensors`; TypeError for an item that cannot be read.
inline std::vector<std::uintptr_t> data_ptrs(const pybind11::list& tensors) {
  const Py_ssize_t n = PyList_GET_SIZE(tensors.ptr());
  std::vector<std::uintptr_t> out(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    TensorFacts f;
    if (!read_facts(PyList_GET_ITEM(tensors.ptr(), i), &f))
      throw pybind11::type_error("data_ptrs: item " + std::to_string(i) +
                                 " is not a tensor whose address can be read");
    out[i] = f.ptr;
  }
  return out;
}

}  // namespace tp
