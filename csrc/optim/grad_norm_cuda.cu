// grad_norm_cuda.cu: the gradient pre-pass on the GPU, for norm clipping, loss unscaling and the
// finite check, with no host synchronisation. grad_sumsq reads every gradient once and adds the
// sum of squares to a device double; finish_grad_control turns that sum into the norm, the skip
// flag and the gradient multiplier that the update kernels read from device memory.
//
// Squares are accumulated in double, as on the CPU (grad_norm_cpu.cpp): the square of a finite
// float, half or bfloat16 cannot overflow a double, so a non-finite sum means a non-finite gradient.
//
// Determinism: each block reduces its partial in a fixed order (per-thread sums, warp shuffles,
// then the warps in order), then adds it to *sumsq_dev with one atomicAdd on double. The order of
// those atomics varies from run to run, so the last bits of the double sum may too; the float norm
// and multiplier derived from it almost always round the same. A fixed-order reduction across
// blocks would need scratch memory that the API does not provide (no allocation is allowed here:
// the calls must be capturable in CUDA graphs).
#include <cmath>
#include <stdexcept>

#include "../common/cuda_api.h"
#include "../common/multi_tensor.cuh"

namespace tp {
namespace cuda {
namespace {

using mt::kBlock;

// Elements per block: larger than the update's chunk, so there are fewer partials to add.
constexpr int kSumsqChunk = 4 * mt::kChunk;
constexpr int kWarps = kBlock / 32;

// Sum of squares of one piece of gradients, added to a per-thread double.
template <typename P>
struct SumsqPiece {
  static constexpr int N = mt::kVecBytes / sizeof(P);
  const P* __restrict__ g;
  double& acc;

  __device__ __forceinline__ void scalar(int k) {
    const double x = static_cast<double>(mt::to_op(mt::load_one(g + k)));
    acc += x * x;                                            // sum of g^2
  }
  __device__ __forceinline__ void vector(int k) {
    const mt::Vec<P, N> v = mt::load_vec<N>(g + k);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const double x = static_cast<double>(mt::to_op(v.v[e]));
      acc += x * x;                                          // sum of g^2
    }
  }
};

// Sum over the block in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double x) {
  __shared__ double warp_sums[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);  // within a warp
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  x = 0.0;
  if (warp == 0) {
    x = lane < kWarps ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);  // across warps
  }
  return x;
}

template <typename P>
__global__ void __launch_bounds__(kBlock) sumsq_kernel(mt::DevTable t, double* out) {
  double acc = 0.0;
  mt::for_each_piece<kSumsqChunk>(t, blockIdx.x, [&](int64_t i, int64_t b, int len) {
    SumsqPiece<P> piece{mt::row_ptr<const P>(t, kGrad, i) + b, acc};
    mt::piece_loop<SumsqPiece<P>::N>(len, mt::head_length<SumsqPiece<P>::N>(piece.g), piece);
  });
  const double block = block_sum(acc);
  if (threadIdx.x == 0) atomicAdd(out, block);               // total += this block's partial
}

__global__ void finish_kernel(FinishGradParams p) {
  const double inv = p.inv_scale ? static_cast<double>(*p.inv_scale) : 1.0;  // loss-scale reciprocal
  const double norm = sqrt(*p.sumsq) * inv;                  // L2 norm of the unscaled gradients
  double mul = inv;                                          // no clipping: just unscale
  if (p.max_norm > 0.0f) {
    double clip = static_cast<double>(p.max_norm) / (norm + 1e-6);  // clip_grad_norm_'s coefficient
    if (clip == clip) clip = fmin(clip, 1.0);                // clamp(max=1), which keeps NaN
    mul = inv * clip;                                        // unscale and clip in one factor
  }
  if (p.norm) *p.norm = static_cast<float>(norm);
  if (p.skip && !isfinite(norm)) *p.skip = 1.0f;             // skip |= !finite(norm)
  if (p.grad_mul) *p.grad_mul = static_cast<float>(mul);
}

}  // namespace

void grad_sumsq(const TensorTable& t, double* sumsq_dev, int device, std::uintptr_t stream) {
  if (t.n <= 0 || t.total <= 0) return;
  DeviceGuard guard(device);
  const mt::DevTable dt{t.rows, t.n, t.total};
  const unsigned blocks = static_cast<unsigned>(mt::blocks_for(t.total, kSumsqChunk));
  mt::dispatch_types(t, [&](auto p_tag, auto, auto) {
    using P = typename decltype(p_tag)::type;
    sumsq_kernel<P><<<blocks, kBlock, 0, mt::as_stream(stream)>>>(dt, sumsq_dev);
    TP_CUDA_CHECK_LAUNCH("sumsq_kernel");
  });
}

void finish_grad_control(const FinishGradParams& p, int device, std::uintptr_t stream) {
  if (p.sumsq == nullptr) throw std::invalid_argument("finish_grad_control: sumsq is null");
  DeviceGuard guard(device);
  finish_kernel<<<1, 1, 0, mt::as_stream(stream)>>>(p);
  TP_CUDA_CHECK_LAUNCH("finish_kernel");
}

}  // namespace cuda
}  // namespace tp
