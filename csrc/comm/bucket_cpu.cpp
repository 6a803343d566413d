// bucket_cpu.cpp: pack gradients into a flat all-reduce bucket and unpack them back, on the CPU,
// with the 1/world_size scale and the wire cast fused into the one pass (see BucketParams in
// common/params.h).
// Reference: plain torch, `bucket[off:off+n] = (g * scale).to(wire)` (tests/test_distributed_sync.py).
// Compiled once per instruction set like csrc/optim (the loops vectorise; F16C converts float16
// in the AVX2/AVX-512 builds). Threads split the concatenation of the tensors evenly.
#include "../common/cpu_isa.h"
#include "../common/cpu_kernels.h"

namespace tp {
namespace TP_ISA {
namespace {

// Math type: double if either side is double, else float (what torch computes 16-bit ops in).
template <typename A, typename B>
struct PairMath { using type = float; };
template <typename B> struct PairMath<double, B> { using type = double; };
template <typename A> struct PairMath<A, double> { using type = double; };
template <> struct PairMath<double, double> { using type = double; };

// Rounding from the math type to a storage type (16-bit: round to nearest even, from float).
template <typename S, typename M>
static inline S to_storage(M x) {
  return Store<S>::from(static_cast<typename OpMath<S>::type>(x));
}

template <typename T, typename W>
struct PackWorker {
  using M = typename PairMath<T, W>::type;
  const BucketParams& p;
  void operator()(int64_t i, int64_t b, int64_t e) {
    const TensorTable& t = p.tensors;
    const T* src = row_ptr<const T>(t, kGrad, i);
    W* dst = static_cast<W*>(p.bucket) + t.rows[kPrefix * t.n + i];  // tensor i's place in the bucket
    const M s = static_cast<M>(p.scale);
    if (src == nullptr) {                                    // absent gradient: counts as zeros
      const W zero = to_storage<W>(static_cast<M>(0));
      for (int64_t j = b; j < e; ++j) dst[j] = zero;
      return;
    }
    // No __restrict__: src may be dst (the gradient is a view of its bucket slot).
    for (int64_t j = b; j < e; ++j) dst[j] = to_storage<W>(static_cast<M>(to_op(src[j])) * s);  // wire(g * s)
  }
};

template <typename T, typename W>
struct UnpackWorker {
  using M = typename PairMath<T, W>::type;
  const BucketParams& p;
  void operator()(int64_t i, int64_t b, int64_t e) {
    const TensorTable& t = p.tensors;
    T* dst = row_ptr<T>(t, kGrad, i);
    if (dst == nullptr) return;                              // absent: nothing to write back
    const W* src = static_cast<const W*>(p.bucket) + t.rows[kPrefix * t.n + i];
    const M s = static_cast<M>(p.scale);
    for (int64_t j = b; j < e; ++j) dst[j] = to_storage<T>(static_cast<M>(to_op(src[j])) * s);  // dtype(w * s)
  }
};

// Calls fn(T{}) with the storage type of a dtype tag.
template <typename Fn>
static void dispatch_storage(DType d, Fn&& fn) {
  switch (d) {
    case DType::Float32: fn(float{}); break;
    case DType::Float64: fn(double{}); break;
    case DType::BFloat16: fn(bf16_t{}); break;
    case DType::Float16: fn(f16_t{}); break;
  }
}

template <template <typename, typename> class Worker>
static void run(const BucketParams& p, int num_threads) {
  dispatch_storage(p.tensors.dtype, [&](auto t_tag) {
    dispatch_storage(p.wire_dtype, [&](auto w_tag) {
      using T = decltype(t_tag);
      using W = decltype(w_tag);
      for_each_piece(p.tensors, num_threads, [&] { return Worker<T, W>{p}; });
    });
  });
}

}  // namespace

void bucket_pack(const BucketParams& p, int num_threads) { run<PackWorker>(p, num_threads); }
void bucket_unpack(const BucketParams& p, int num_threads) { run<UnpackWorker>(p, num_threads); }

}  // namespace TP_ISA
}  // namespace tp
