// params.h: the plain structs that cross the Python/C++ boundary for the optimizer and
// gradient-bucket kernels. Kernels (CPU and CUDA) receive only these: raw pointers, element counts,
// scalars. No torch types, so the extension never links libtorch and one build serves every torch
// version.
#pragma once
#include <cstdint>

namespace tp {

// Element type tags, fixed integers shared with python/trainpatterns/_kernels/_native.py.
enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// Rows of a tensor table: an int64 array laid out [kRows][n]. Row kNumel holds element counts,
// the other rows hold addresses (0 where the optimizer does not use that row).
enum TableRow : int32_t {
  kNumel = 0,
  kParam = 1,   // parameter storage (param dtype); with master weights the 16-bit copy
  kGrad = 2,    // gradient, same dtype and element count as the parameter
  kState0 = 3,  // exp_avg (Adam) | momentum_buffer (SGD) | sum (Adagrad)
  kState1 = 4,  // exp_avg_sq (Adam)
  kState2 = 5,  // max_exp_avg_sq (Adam, amsgrad)
  kMaster = 6,  // fp32 master copy (master_weights=True), else 0
  kPrefix = 7,  // exclusive prefix sum of kNumel: where tensor i starts in the concatenation
  kRows = 8,
};

// A homogeneous list of n tensors: one dtype, one device, one set of hyperparameters.
// `steps` holds one float step count per tensor (torch's layout for state["step"]); kernels
// increment it themselves unless the step is skipped.
struct TensorTable {
  const int64_t* rows;       // [kRows][n], host memory for CPU kernels, device memory for CUDA ones
  const int64_t* host_rows;  // the same table in host memory (CUDA launch configuration)
  int64_t n;
  int64_t total;             // sum of kNumel
  float* steps;         // [n], on the tensors' device
  DType dtype;          // parameter (and gradient) dtype
  int32_t master;       // 1: fp32 master copy + fp32 states; parameters are 16-bit
};

// Gradient pre-processing applied inside the update: g_used = g * grad_mul.
// grad_mul folds the loss-scale reciprocal and the clip factor. On CUDA the factor and the skip
// flag may live in device memory (written by the norm kernel) so that no host sync is needed.
struct GradControl {
  double grad_mul;             // used when grad_mul_dev is null
  const float* grad_mul_dev;   // device scalar or null
  const float* skip_dev;       // device flag (nonzero: skip the step entirely) or null
};

// Hyperparameters are doubles, as torch's are Python floats: derived scalars (1 - beta, bias
// corrections) are computed in double and rounded once to the math type of the kernel.
struct AdamParams {
  double lr;
  const float* lr_dev;  // CUDA only: learning rate in device memory (graph capture), or null
  double beta1, beta2, eps, weight_decay;
  int32_t decoupled;    // 1: AdamW (decoupled weight decay), 0: Adam (L2 added to the gradient)
  int32_t amsgrad, maximize;
};

struct SgdParams {
  double lr;
  const float* lr_dev;
  double momentum, dampening, weight_decay;
  int32_t nesterov, maximize;
};

struct AdagradParams {
  double lr;
  const float* lr_dev;
  double lr_decay, weight_decay, eps;
  int32_t maximize;
};

// The last step of the gradient pre-pass on CUDA (finish_grad_control), all in device memory:
//   norm     = sqrt(*sumsq) * inv_scale
//   skip     = 1 if the norm is not finite (never reset: it may already hold a found_inf)
//   grad_mul = inv_scale * min(1, max_norm / (norm + 1e-6)), or inv_scale when max_norm <= 0
// where inv_scale is *inv_scale, or 1 when that pointer is null.
struct FinishGradParams {
  const double* sumsq;      // accumulated sum of squares of the (scaled) gradients
  const float* inv_scale;   // reciprocal of the loss scale, or null
  float max_norm;           // clipping threshold (<= 0: no clipping), as the norm's float
  float* norm;              // out, or null
  float* skip;              // out, or null
  float* grad_mul;          // out, or null
};

// A flat bucket and the tensors that live in it, for the gradient-bucket kernels (csrc/comm), which
// fuse the scale by 1/world_size and the dtype cast into one pass:
//   pack:   bucket[off_i + j] = wire(tensor_i[j] * scale)       (absent tensor: zeros)
//   unpack: tensor_i[j]       = dtype(bucket[off_i + j] * scale) (absent tensor: skipped)
// A tensor may alias its own place in the bucket (pack in place: the gradient is a bucket view).
// Of `tensors` (a TensorTable, so that the optimizer
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
