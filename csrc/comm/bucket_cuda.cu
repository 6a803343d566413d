// bucket_cuda.cu: the CUDA twin of bucket_cpu.cpp. Pack gradients into a flat all-reduce bucket
// and unpack them back, with the 1/world_size scale and the wire cast fused into the one pass (see
// BucketParams in common/params.h for the maths). The tensor walk, vectorisation and alignment
// peeling are the optimizer kernels' engine (csrc/common/multi_tensor.cuh): the tensors' bucket
// offsets play the role of the prefix sum, so small tensors share a block and gaps between them
// are never visited.
// Launches go on the caller's stream, allocate nothing and never synchronize.
#include <type_traits>

#include "../common/cuda_api.h"
#include "../common/multi_tensor.cuh"

namespace tp {
namespace cuda {
namespace {

// Math type: double if either side is double, else float.
template <typename A, typename B>
using PairMath = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>, double, float>;

template <typename S, typename M>
__device__ __forceinline__ S to_storage(M x) {
  return mt::Store<S>::from(static_cast<typename mt::OpMath<S>::type>(x));
}

// Elements per vector: 16 bytes of the wider type, at most 8.
template <typename A, typename B>
constexpr int vec_width() {
  constexpr int w = mt::kVecBytes / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));
  return w < 8 ? w : 8;
}

// One piece of a copy src -> dst with a scale and a cast; src == nullptr writes zeros. src may
// equal dst (in-place pack of a gradient that is a view of its bucket slot): each element is read
// before it is written, by the same thread.
template <typename S, typename D>
struct CastPiece {
  using M = PairMath<S, D>;
  static constexpr int N = vec_width<S, D>();
  const S* src;
  D* dst;
  M scale;

  __device__ __forceinline__ D value(S x) const { return to_storage<D>(static_cast<M>(mt::to_op(x)) * scale); }

  __device__ __forceinline__ void scalar(int k) {
    mt::store_one(dst + k, src ? value(mt::load_one(src + k)) : to_storage<D>(static_cast<M>(0)));
  }
  __device__ __forceinline__ void vector(int k) {
    mt::Vec<D, N> out;
    if (src) {
      const mt::Vec<S, N> in = mt::load_vec<N>(src + k);
#pragma unroll
      for (int e = 0; e < N; ++e) out.v[e] = value(in.v[e]);   // dst = cast(src * scale)
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) out.v[e] = to_storage<D>(static_cast<M>(0));  // absent: zeros
    }
    mt::store_vec<N>(dst + k, out);
  }
  __device__ __forceinline__ int head() const {
    return src ? mt::head_length<N>(src, dst) : mt::head_length<N>(dst);
  }
};

template <typename T, typename W, bool PACK>
__global__ void __launch_bounds__(mt::kBlock) bucket_kernel(mt::DevTable t, void* bucket, double scale) {
  mt::for_each_piece<mt::kChunk>(t, blockIdx.x, [&](int64_t i, int64_t b, int len) {
    T* tensor = mt::row_ptr<T>(t, kGrad, i);
    W* slot = static_cast<W*>(bucket) + mt::row_at(t, kPrefix, i) + b;  // tensor i's place in the bucket
    if constexpr (PACK) {
      CastPiece<T, W> piece{tensor ? tensor + b : nullptr, slot, static_cast<PairMath<T, W>>(scale)};
      mt::piece_loop<CastPiece<T, W>::N>(len, piece.head(), piece);
    } else {
      if (tensor == nullptr) return;                                   // absent: nothing to write back
      CastPiece<W, T> piece{slot, tensor + b, static_cast<PairMath<T, W>>(scale)};
      mt::piece_loop<CastPiece<W, T>::N>(len, piece.head(), piece);
    }
  });
}

template <typename Fn>
void dispatch_storage(DType d, Fn&& fn) {
  switch (d) {
    case DType::Float32: fn(mt::Tag<float>{}); break;
    case DType::Float64: fn(mt::Tag<double>{}); break;
    case DType::BFloat16: fn(mt::Tag<__nv_bfloat16>{}); break;
    case DType::Float16: fn(mt::Tag<__half>{}); break;
  }
}

template <bool PACK>
void launch(const BucketParams& p, int device, std::uintptr_t stream) {
  const TensorTable& t = p.tensors;
  if (t.n <= 0 || t.total <= 0) return;
  DeviceGuard guard(device);
  const mt::DevTable dt{t.rows, t.n, t.total};
  const unsigned blocks = static_cast<unsigned>(mt::blocks_for(t.total, mt::kChunk));
  dispatch_storage(t.dtype, [&](auto t_tag) {
    dispatch_storage(p.wire_dtype, [&](auto w_tag) {
      using T = typename decltype(t_tag)::type;
      using W = typename decltype(w_tag)::type;
      bucket_kernel<T, W, PACK><<<blocks, mt::kBlock, 0, mt::as_stream(stream)>>>(dt, p.bucket, p.scale);
      TP_CUDA_CHECK_LAUNCH("bucket_kernel");
    });
  });
}

}  // namespace

void bucket_pack(const BucketParams& p, int device, std::uintptr_t stream) { launch<true>(p, device, stream); }
void bucket_unpack(const BucketParams& p, int device, std::uintptr_t stream) { launch<false>(p, device, stream); }

}  // namespace cuda
}  // namespace tp
