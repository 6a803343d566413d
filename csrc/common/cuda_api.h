// cuda_api.h: entry points of the CUDA kernels (csrc/optim/*_cuda.cu, csrc/comm/bucket_cuda.cu),
// compiled only when nvcc is found (TP_WITH_CUDA). Every launch goes on the caller's stream and
// never synchronizes the device, so the calls can be captured in CUDA graphs. Errors become
// std::runtime_error with the CUDA message. `device` is the CUDA ordinal the tensors live on.
#pragma once
#include <cstdint>
#include <string>

#include "params.h"

namespace tp {
namespace cuda {

// Number of CUDA devices usable by this process; 0 (never an exception) with no driver or GPU.
int device_count();
// The architectures this module was compiled for, e.g. "80;90".
std::string compiled_archs();
// Runtime version the module was linked against, e.g. 13000.
int runtime_version();

void adam_step(const TensorTable& t, const AdamParams& hp, const GradControl& gc, int device,
               std::uintptr_t stream);
void sgd_step(const TensorTable& t, const SgdParams& hp, const GradControl& gc, int device,
              std::uintptr_t stream);
void adagrad_step(const TensorTable& t, const AdagradParams& hp, const GradControl& gc, int device,
                  std::uintptr_t stream);

// Adds the sum of squares of every gradient of `t`, accumulated in double (grad_norm_cuda.cu says
// how deterministic it is), to *sumsq_dev (a double in device memory, which the caller zeroes first).
void grad_sumsq(const TensorTable& t, double* sumsq_dev, int device, std::uintptr_t stream);

// From the accumulated sum of squares, on the device: the norm, the skip flag and the gradient
// multiplier of FinishGradParams (params.h). The skip flag may alias a GradScaler found_inf
// tensor: when it is already nonzero it stays nonzero.
void finish_grad_control(const FinishGradParams& p, int device, std::uintptr_t stream);

// The gradient-bucket maths of BucketParams (params.h), one fused pass over the whole bucket.
void bucket_pack(const BucketParams& p, int device, std::uintptr_t stream);
void bucket_unpack(const BucketParams& p, int device, std::uintptr_t stream);

}  // namespace cuda
}  // namespace tp
