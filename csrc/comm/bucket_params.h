// bucket_params.h: the plain struct that crosses the Python/C++ boundary for the gradient-bucket
// kernels (bucket_cpu.cpp, bucket_cuda.cu), which trainpatterns.distributed runs around every
// all-reduce. Like the optimizer kernels, they see raw pointers, element counts and dtype tags only.
#pragma once
#include <cstdint>

#include "../common/params.h"

namespace tp {

// A flat bucket and the tensors that live in it. Of `tensors` (a TensorTable, so that the optimizer
// kernels' tensor walk is reused) only three rows are read: kNumel (elements of tensor i), kGrad
// (its address; 0 means "absent": packed as zeros, skipped by unpack) and kPrefix (where it starts
// in the bucket, in elements: offsets may leave gaps, e.g. for alignment, which are never touched).
// tensors.dtype is the tensors' dtype, tensors.total the bucket span (max of offset + numel);
// steps and master are unused.
struct BucketParams {
  TensorTable tensors;
  void* bucket;       // the flat buffer, wire_dtype elements
  DType wire_dtype;   // what the all-reduce moves: the gradient dtype, or bfloat16/float16 to compress
  double scale;       // multiplier applied in the math type (float, or double if either dtype is double)
};

}  // namespace tp
