// multi_tensor.cuh: the one multi-tensor engine of the CUDA optimizer kernels (apex style: one
// engine, one small per-element functor per optimizer).
//
// The tensors of a table are seen as one concatenation: tensor i owns global elements
// [prefix[i], prefix[i] + numel[i]) (rows kPrefix and kNumel). Block b owns the global range
// [b * chunk, (b + 1) * chunk) clipped to `total`, so the grid is ceil(total / chunk) whatever the
// tensor sizes are, and small tensors share a block instead of wasting one. A block finds the first
// tensor it touches by binary search over kPrefix, then walks the following tensors until its range
// ends; each (tensor, local range) is a "piece".
//
// Within a piece, each thread moves vectors of N elements per tensor in single loads and stores
// (optimizer updates: N = 4, so float4 for fp32, 8 bytes of bf16/fp16, 16 bytes of fp32 master and
// states, and N = 2 for double; the gradient norm: 16 bytes of any type) wherever every pointer
// involved reaches N-element alignment at the same element: a few scalar elements peel the head,
// vectors cover the middle, scalars the tail. A piece whose pointers disagree on alignment (views
// at odd offsets) runs scalar. The peeling matters because a chunk boundary falls at an arbitrary
// offset inside a tensor whenever an earlier tensor has an odd size (278011 elements).
//
// Every block's work is independent, there is no __syncthreads inside a piece, and nothing is
// allocated: launches are CUDA-graph capturable. Math happens in float for 16- and 32-bit types and
// in double for double, as in the CPU kernels (csrc/common/cpu_isa.h).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda_check.h"
#include "params.h"

namespace tp {
namespace cuda {
namespace mt {

constexpr int kBlock = 256;          // threads per block
constexpr int kMinBlocksPerSm = 4;   // with kBlock: at most 64 registers per thread
constexpr int kChunk = 8192;         // elements of the concatenation per block (update kernels)
constexpr int kVecBytes = 16;        // widest load/store

// ---- types: storage type -> math type, conversions ----

template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };

__device__ __forceinline__ float to_op(float x) { return x; }
__device__ __forceinline__ double to_op(double x) { return x; }
__device__ __forceinline__ float to_op(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_op(__half x) { return __half2float(x); }

// Rounding from the math type to storage: round to nearest even, as the CPU kernels do.
template <typename T> struct Store;
template <> struct Store<float> {
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <> struct Store<double> {
  static __device__ __forceinline__ double from(double x) { return x; }
};
template <> struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};
template <> struct Store<__half> {
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};

// IEEE-rounded square root and division: the module is compiled with --use_fast_math, which would
// otherwise turn '/' and sqrtf into approximations that differ from torch and the CPU kernels.
__device__ __forceinline__ float op_sqrt(float x) { return __fsqrt_rn(x); }
__device__ __forceinline__ double op_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float op_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double op_div(double a, double b) { return a / b; }

// N elements of T loaded or stored as one aligned access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// The bits of B bytes as one builtin type, so that a vector moves in one instruction.
template <int B> struct RawBits;
template <> struct RawBits<2> { using type = unsigned short; };
template <> struct RawBits<4> { using type = unsigned int; };
template <> struct RawBits<8> { using type = unsigned long long; };
template <> struct RawBits<16> { using type = uint4; };

// Loads and stores of N elements at p (aligned to N elements), in global memory.
template <int N, typename T>
__device__ __forceinline__ Vec<std::remove_const_t<T>, N> load_vec(T* p) {
  using V = Vec<std::remove_const_t<T>, N>;
  using R = typename RawBits<sizeof(V)>::type;
  __builtin_assume(__isGlobal(p));
  const R r = *reinterpret_cast<const R*>(p);
  V v;
  __builtin_memcpy(&v, &r, sizeof(V));
  return v;
}
template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  using R = typename RawBits<sizeof(x)>::type;
  __builtin_assume(__isGlobal(p));
  R r;
  __builtin_memcpy(&r, &x, sizeof(x));
  *reinterpret_cast<R*>(p) = r;
}
template <typename T>
__device__ __forceinline__ std::remove_const_t<T> load_one(T* p) {
  return load_vec<1>(p).v[0];
}
template <typename T>
__device__ __forceinline__ void store_one(T* p, T x) {
  store_vec<1>(p, Vec<T, 1>{{x}});
}

// ---- the table ----

// The device copy of a TensorTable's rows, with the sizes needed to walk it.
struct DevTable {
  const int64_t* rows;  // [kRows][n] in device memory
  int64_t n;
  int64_t total;
};

__device__ __forceinline__ int64_t row_at(const DevTable& t, TableRow r, int64_t i) {
  return static_cast<int64_t>(__ldg(reinterpret_cast<const long long*>(t.rows + r * t.n + i)));
}

template <typename T>
__device__ __forceinline__ T* row_ptr(const DevTable& t, TableRow r, int64_t i) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(row_at(t, r, i)));
}

// Calls visit(i, b, len) for each piece of global chunk `chunk_index`: tensor i, local elements
// [b, b + len), len > 0. Uniform across the block (every thread sees the same pieces).
template <int CHUNK, typename Visit>
__device__ __forceinline__ void for_each_piece(const DevTable& t, int64_t chunk_index, Visit&& visit) {
  const int64_t lo = chunk_index * CHUNK;
  const int64_t hi = lo + CHUNK < t.total ? lo + CHUNK : t.total;
  // Binary search for the last tensor starting at or before lo. It contains lo: were it empty,
  // the next tensor would start at the same place and be a later such tensor.
  int64_t a = 0, z = t.n - 1;
  while (a < z) {
    const int64_t mid = (a + z + 1) >> 1;
    if (row_at(t, kPrefix, mid) <= lo) a = mid; else z = mid - 1;
  }
  for (int64_t i = a; i < t.n; ++i) {
    const int64_t start = row_at(t, kPrefix, i);
    if (start >= hi) break;
    const int64_t end = start + row_at(t, kNumel, i);
    const int64_t b = (lo > start ? lo : start) - start;
    const int64_t e = (hi < end ? hi : end) - start;
    if (e > b) visit(i, b, static_cast<int>(e - b));  // empty tensors give e <= b: skipped
  }
}

// ---- alignment ----

// Position of p within its N-element vector grid, or -1 when p is not even element aligned.
template <int N, typename T>
__device__ __forceinline__ int vec_phase(const T* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return a % sizeof(T) ? -1 : static_cast<int>((a / sizeof(T)) % N);
}

// Number of leading scalar elements after which every pointer is N-vector aligned, or -1 when
// the pointers disagree (the piece then runs scalar).
template <int N, typename T>
__device__ __forceinline__ int common_phase(const T* p) {
  return vec_phase<N>(p);
}
template <int N, typename T, typename... Rest>
__device__ __forceinline__ int common_phase(const T* p, const Rest*... rest) {
  const int a = vec_phase<N>(p);
  const int b = common_phase<N>(rest...);
  return a == b ? a : -1;
}
template <int N, typename... Ptrs>
__device__ __forceinline__ int head_length(const Ptrs*... ptrs) {
  const int phase = common_phase<N>(ptrs...);
  return phase < 0 ? -1 : (N - phase) % N;
}

// Spreads a piece of `len` elements over the block: body.vector(k) for N-element vectors starting
// at k, body.scalar(k) for the head (the first `head` elements), the tail and, when head < 0, for
// everything. k counts from the start of the piece.
template <int N, typename Body>
__device__ __forceinline__ void piece_loop(int len, int head, Body& body) {
  if (head < 0 || head > len) head = len;
  const int nvec = (len - head) / N;
  const int tail = head + nvec * N;
  for (int q = threadIdx.x; q < nvec; q += kBlock) body.vector(head + q * N);
  // Head and tail together: fewer than 2N elements, or the whole piece on the scalar path.
  const int nscalar = head + (len - tail);
  for (int k = threadIdx.x; k < nscalar; k += kBlock) body.scalar(k < head ? k : tail + (k - head));
}

// ---- the inputs every optimizer shares ----

// The learning rate and gradient multiplier of one launch (from the host, or read from device
// memory when the pointer is set, so that no host sync is needed), the maximize sign and the
// table's step counts. Every optimizer functor holds one as `in`, filled by step_inputs().
struct StepInputs {
  double lr, grad_mul, sign;
  const float* lr_dev;
  const float* grad_mul_dev;
  const float* steps;

  __device__ __forceinline__ double lr_now() const { return lr_dev ? static_cast<double>(*lr_dev) : lr; }
  __device__ __forceinline__ double grad_mul_now() const {
    return grad_mul_dev ? static_cast<double>(*grad_mul_dev) : grad_mul;
  }
};

// From any optimizer's params struct (fields lr, lr_dev, maximize) and the launch's GradControl.
template <typename Params>
StepInputs step_inputs(const TensorTable& t, const Params& hp, const GradControl& gc) {
  return StepInputs{hp.lr, gc.grad_mul, hp.maximize ? -1.0 : 1.0, hp.lr_dev, gc.grad_mul_dev, t.steps};
}

// ---- the optimizer update ----

// One piece of an optimizer update: loads grad, param (or the fp32 master), the F::kStates state
// tensors, calls the functor per element, stores everything it loaded, plus the 16-bit param
// rounded from the master.
//
// Functor F (per optimizer): kStates, kSlots (= max(kStates, 1)), `in` (its StepInputs, the
// table's step counts among them), a Scalars struct made by F::scalars(step) (per-tensor values:
// step-dependent corrections, lr, grad multiplier), and operator()(scalars, g, p, s) updating p and
// the states s in the math type.
template <typename P, typename S, bool MASTER, typename F>
struct UpdatePiece {
  using M = typename OpMath<P>::type;
  static constexpr int kStates = F::kStates;
  static constexpr int kSlots = F::kSlots;
  // Vector width in elements: 16 bytes of the widest stored type, at most 4. Eight 16-bit
  // elements per thread would keep more values live than 64 registers hold (Adam spilled).
  static constexpr int kWide = kVecBytes / (sizeof(P) > sizeof(S) ? sizeof(P) : sizeof(S));
  static constexpr int N = kWide < 4 ? kWide : 4;

  P* __restrict__ param;
  const P* __restrict__ grad;
  float* __restrict__ master;
  S* __restrict__ st[kSlots];
  const F& f;
  const typename F::Scalars& c;

  __device__ __forceinline__ void scalar(int k) {
    const M g = to_op(load_one(grad + k));
    M p;
    if constexpr (MASTER) p = static_cast<M>(load_one(master + k)); else p = to_op(load_one(param + k));
    M s[kSlots];
#pragma unroll
    for (int r = 0; r < kStates; ++r) s[r] = to_op(load_one(st[r] + k));
    f(c, g, p, s);
#pragma unroll
    for (int r = 0; r < kStates; ++r) store_one(st[r] + k, Store<S>::from(s[r]));
    if constexpr (MASTER) store_one(master + k, static_cast<float>(p));
    store_one(param + k, Store<P>::from(p));
  }

  __device__ __forceinline__ void vector(int k) {
    const Vec<P, N> gv = load_vec<N>(grad + k);
    Vec<P, N> pv;
    Vec<float, N> wv;
    if constexpr (MASTER) wv = load_vec<N>(master + k); else pv = load_vec<N>(param + k);
    Vec<S, N> sv[kSlots];
#pragma unroll
    for (int r = 0; r < kStates; ++r) sv[r] = load_vec<N>(st[r] + k);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const M g = to_op(gv.v[e]);
      M p;
      if constexpr (MASTER) p = static_cast<M>(wv.v[e]); else p = to_op(pv.v[e]);
      M s[kSlots];
#pragma unroll
      for (int r = 0; r < kStates; ++r) s[r] = to_op(sv[r].v[e]);
      f(c, g, p, s);
#pragma unroll
      for (int r = 0; r < kStates; ++r) sv[r].v[e] = Store<S>::from(s[r]);
      if constexpr (MASTER) wv.v[e] = static_cast<float>(p);
      pv.v[e] = Store<P>::from(p);
    }
#pragma unroll
    for (int r = 0; r < kStates; ++r) store_vec<N>(st[r] + k, sv[r]);
    if constexpr (MASTER) store_vec<N>(master + k, wv);
    store_vec<N>(param + k, pv);
  }

  // Leading scalar elements before all pointers are vector aligned (-1: never).
  __device__ __forceinline__ int head() const {
    int h = MASTER ? head_length<N>(grad, param, master) : head_length<N>(grad, param);
#pragma unroll
    for (int r = 0; r < kStates; ++r) {
      const int hr = head_length<N>(st[r]);
      h = (h == hr) ? h : -1;
    }
    return h;
  }
};

// Skips everything when the device flag says so; read in-kernel, never copied to the host.
__device__ __forceinline__ bool skip_step(const float* skip) { return skip != nullptr && *skip != 0.0f; }

template <typename P, typename S, bool MASTER, typename F>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm)
update_kernel(DevTable t, F f, const float* skip) {
  if (skip_step(skip)) return;
  // The per-tensor scalars depend on the launch and the step count only: like the CPU kernels,
  // recompute them (double pow and divisions) only when the step count changes between pieces.
  float cached_step = __int_as_float(0x7fc00000);  // NaN: unequal to any step
  typename F::Scalars c{};
  for_each_piece<kChunk>(t, blockIdx.x, [&](int64_t i, int64_t b, int len) {
    const float step = f.in.steps[i];
    if (step != cached_step) {
      c = f.scalars(step);
      cached_step = step;
    }
    UpdatePiece<P, S, MASTER, F> piece{row_ptr<P>(t, kParam, i) + b, row_ptr<const P>(t, kGrad, i) + b,
                                       MASTER ? row_ptr<float>(t, kMaster, i) + b : nullptr, {}, f, c};
#pragma unroll
    for (int r = 0; r < F::kStates; ++r)
      piece.st[r] = row_ptr<S>(t, static_cast<TableRow>(kState0 + r), i) + b;
    piece_loop<UpdatePiece<P, S, MASTER, F>::N>(len, piece.head(), piece);
  });
}

namespace {  // one copy per .cu file: no relocatable device code needed
// steps[i] += 1 for every tensor (empty ones included, as on the CPU), unless the step is skipped.
// Runs before the update so that every block of the update reads the new count.
__global__ void __launch_bounds__(kBlock) increment_steps_kernel(float* steps, int64_t n, const float* skip) {
  if (skip_step(skip)) return;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (i < n) steps[i] += 1.0f;
}
}  // namespace

inline int64_t blocks_for(int64_t total, int64_t chunk) { return (total + chunk - 1) / chunk; }

inline cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Launches one optimizer step on `stream`: the step increment, then the update over all pieces.
template <typename P, typename S, bool MASTER, typename F>
void launch_update(const TensorTable& t, const F& f, const GradControl& gc, std::uintptr_t stream) {
  if (t.n <= 0) return;
  const cudaStream_t s = as_stream(stream);
  increment_steps_kernel<<<static_cast<unsigned>(blocks_for(t.n, kBlock)), kBlock, 0, s>>>(t.steps, t.n,
                                                                                             gc.skip_dev);
  TP_CUDA_CHECK_LAUNCH("increment_steps_kernel");
  if (t.total <= 0) return;
  const DevTable dt{t.rows, t.n, t.total};
  update_kernel<P, S, MASTER, F><<<static_cast<unsigned>(blocks_for(t.total, kChunk)), kBlock, 0, s>>>(
      dt, f, gc.skip_dev);
  TP_CUDA_CHECK_LAUNCH("update_kernel");
}

// ---- dtype dispatch (host) ----

template <typename T> struct Tag { using type = T; };

// Calls fn(Tag<P>, Tag<S>, std::bool_constant<master>) for the parameter storage type P and the
// state type S of `t` (fp32 states with master weights, else the parameter type).
template <typename Fn>
void dispatch_types(const TensorTable& t, Fn&& fn) {
  switch (t.dtype) {
    case DType::Float32: fn(Tag<float>{}, Tag<float>{}, std::false_type{}); break;
    case DType::Float64: fn(Tag<double>{}, Tag<double>{}, std::false_type{}); break;
    case DType::BFloat16:
      if (t.master) fn(Tag<__nv_bfloat16>{}, Tag<float>{}, std::true_type{});
      else fn(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{}, std::false_type{});
      break;
    case DType::Float16:
      if (t.master) fn(Tag<__half>{}, Tag<float>{}, std::true_type{});
      else fn(Tag<__half>{}, Tag<__half>{}, std::false_type{});
      break;
  }
}

// One optimizer step over `t`: for the table's storage and state types, launches the update with the
// functor that make(Tag<M>, std::bool_constant<flag>) builds. `flag` (amsgrad, momentum on) picks
// one of the functor's two variants at run time, so that each variant is a kernel of its own with no
// branch on it inside; an optimizer without such an option passes false and ignores it.
template <typename MakeOp>
void launch_step(const TensorTable& t, const GradControl& gc, std::uintptr_t stream, bool flag, MakeOp&& make) {
  dispatch_types(t, [&](auto p_tag, auto s_tag, auto master) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    using M = typename OpMath<P>::type;
    constexpr bool kMaster = decltype(master)::value;
    if (flag)
      launch_update<P, S, kMaster>(t, make(Tag<M>{}, std::true_type{}), gc, stream);
    else
      launch_update<P, S, kMaster>(t, make(Tag<M>{}, std::false_type{}), gc, stream);
  });
}

}  // namespace mt
}  // namespace cuda
}  // namespace tp
