// cuda_api.h: entry points of the CUDA kernels (csrc/optim/*_cuda.cu), compiled only when nvcc is
// found (TP_WITH_CUDA). Every launch goes on the caller's stream and never synchronizes the device,
// so the calls can be captured in CUDA graphs. Errors become std::runtime_error with the CUDA
// message. `device` is the CUDA ordinal the tensors live on.
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

// Adds the sum of squares of every gradient of `t` (in fp32 partials, fp64 atomics or a two-level
// reduction: the implementation's choice, deterministic for a given launch) to *sumsq_dev (a
// double in device memory, which the caller zeroes first).
void grad_sumsq(const TensorTable& t, double* sumsq_dev, int device, std::uintptr_t stream);

// From the accumulated sum of squares, on the device: norm = sqrt(sumsq) * inv_scale (written to
// *norm_dev as float), skip = 1.0f if the norm is not finite (written to *skip_dev, may alias a
// GradScaler found_inf tensor; when *skip_dev is already nonzero it stays nonzero), and
// grad_mul = inv_scale * min(1, max_norm / (norm + 1e-6)) (or inv_scale when max_norm <= 0)
// written to *grad_mul_dev. inv_scale is read from inv_scale_dev when not null.
void finish_grad_control(const double* sumsq_dev, float inv_scale, const float* inv_scale_dev,
                         float max_norm, float* norm_dev, float* skip_dev, float* grad_mul_dev,
                         int device, std::uintptr_t stream);

}  // namespace cuda
}  // namespace tp
