// cpu_isa.h: helpers shared by the CPU kernel files, which CMake compiles once per instruction set
// (scalar, AVX2, AVX-512) into namespaces tp::isa_<name>. Everything here has internal linkage and
// no std:: templates are used by the kernels: an inline function compiled with AVX-512 flags must
// never be merged by the linker into the scalar build, or it would fault on an older CPU.
#pragma once
#include <cstdint>
#include <cstring>

#include "params.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef TP_ISA
#define TP_ISA isa_scalar
#endif

namespace tp {
namespace TP_ISA {
namespace {

// 16-bit storage types. Arithmetic always happens in the "opmath" type (float, double for double).
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

static inline float to_op(float x) { return x; }
static inline double to_op(double x) { return x; }
static inline float to_op(bf16_t x) {
  // bf16 is the top half of an fp32: shift the bits back into place.
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float to_op(f16_t x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);
}

template <typename T> struct Store;
template <> struct Store<float> { static inline float from(float x) { return x; } };
template <> struct Store<double> { static inline double from(double x) { return x; } };
template <> struct Store<bf16_t> {
  static inline bf16_t from(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    // Round to nearest even: add 0x7fff plus the lowest kept bit, then truncate.
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    // NaN must stay NaN (rounding could carry it into infinity): keep it quiet instead.
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
    return bf16_t{static_cast<uint16_t>(is_nan ? quiet_nan : rounded)};
  }
};
template <> struct Store<f16_t> {
  static inline f16_t from(float f) {
    _Float16 h = static_cast<_Float16>(f);  // IEEE round to nearest even
    f16_t out;
    std::memcpy(&out.bits, &h, 2);
    return out;
  }
};

// Builtins, not std::sqrt: a std:: inline function could be merged across instruction sets.
static inline float op_sqrt(float x) { return __builtin_sqrtf(x); }
static inline double op_sqrt(double x) { return __builtin_sqrt(x); }

template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };

// Below this many elements per thread (torch's own grain size), waking another thread costs more
// than it saves: an AdamW pass over 32K floats takes ~20 us, a wake-up a few.
constexpr int64_t kMinElemsPerThread = 1 << 15;

static inline int64_t threads_for(int64_t total, int num_threads) {
  int64_t nt = num_threads < 1 ? 1 : num_threads;
  int64_t cap = total / kMinElemsPerThread;
  if (cap < 1) cap = 1;
  return nt < cap ? nt : cap;
}

// Split the concatenation of all tensors of `t` into `nt` equal, contiguous ranges of elements, one
// per thread, and hand each thread its pieces as (tensor index, begin, end). `make_worker()` is
// called once per thread so that workers can keep per-thread caches.
template <typename MakeWorker>
static void for_each_piece(const TensorTable& t, int num_threads, MakeWorker make_worker) {
  const int64_t n = t.n;
  const int64_t* numel = t.rows + kNumel * n;
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += numel[i];
  if (total == 0) return;
  const int64_t nt = threads_for(total, num_threads);
  auto run = [&](int64_t tid) {
    auto worker = make_worker();
    const int64_t lo = total / nt * tid + (total % nt) * tid / nt;
    const int64_t hi = total / nt * (tid + 1) + (total % nt) * (tid + 1) / nt;
    int64_t off = 0;
    for (int64_t i = 0; i < n && off < hi; ++i) {
      const int64_t end = off + numel[i];
      if (end > lo && numel[i] > 0) {
        const int64_t b = (lo > off ? lo : off) - off;
        const int64_t e = (hi < end ? hi : end) - off;
        if (e > b) worker(i, b, e);
      }
      off = end;
    }
  };
  if (nt == 1) {
    run(0);
    return;
  }
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(nt))
  for (int64_t tid = 0; tid < nt; ++tid) run(tid);
}

template <typename T>
static inline T* row_ptr(const TensorTable& t, TableRow r, int64_t i) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(t.rows[r * t.n + i]));
}

// A compile-time flag: kernels take their optional paths as template parameters so that inner
// loops have no conditional loads or stores, which would stop the compiler from vectorising them.
template <bool B>
struct Flag {
  static constexpr bool value = B;
};

// Calls fn(P{}, S{}, Flag<master>{}) with the parameter storage type P and state type S of `t`.
template <typename Fn>
static void dispatch_types(const TensorTable& t, Fn&& fn) {
  switch (t.dtype) {
    case DType::Float32: fn(float{}, float{}, Flag<false>{}); break;
    case DType::Float64: fn(double{}, double{}, Flag<false>{}); break;
    case DType::BFloat16:
      if (t.master) fn(bf16_t{}, float{}, Flag<true>{}); else fn(bf16_t{}, bf16_t{}, Flag<false>{});
      break;
    case DType::Float16:
      if (t.master) fn(f16_t{}, float{}, Flag<true>{}); else fn(f16_t{}, f16_t{}, Flag<false>{});
      break;
  }
}

}  // namespace
}  // namespace TP_ISA
}  // namespace tp
