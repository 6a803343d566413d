// comm_kernels.h: entry points of the gradient-bucket kernels. The CPU ones are compiled once per
// instruction set (bucket_cpu.cpp, like csrc/optim) and chosen at run time to match the optimizer
// kernels' choice (comm_dispatch.cpp); the CUDA ones (bucket_cuda.cu) launch on the caller's stream
// and never synchronize. Both directions fuse the scale by 1/world_size and the dtype cast:
//   pack:   bucket[off_i + j] = wire(tensor_i[j] * scale)       (absent tensor: zeros)
//   unpack: tensor_i[j]       = dtype(bucket[off_i + j] * scale) (absent tensor: skipped)
// A tensor may alias its own place in the bucket (pack in place: the gradient is a bucket view).
#pragma once
#include <cstdint>

#include "bucket_params.h"

namespace tp {

struct CommCpuKernels {
  const char* isa;
  void (*pack)(const BucketParams&, int num_threads);
  void (*unpack)(const BucketParams&, int num_threads);
};

#define TP_DECLARE_COMM_ISA(ns) \
  namespace ns {                \
  const CommCpuKernels& comm_kernels(); \
  }
TP_DECLARE_COMM_ISA(isa_scalar)
TP_DECLARE_COMM_ISA(isa_avx2)
TP_DECLARE_COMM_ISA(isa_avx512)
#undef TP_DECLARE_COMM_ISA

// The table of the instruction set cpu_kernels() chose (so both families agree, TRAINPATTERNS_SIMD
// included).
const CommCpuKernels& comm_cpu_kernels();

namespace cuda {
void bucket_pack(const BucketParams& p, int device, std::uintptr_t stream);
void bucket_unpack(const BucketParams& p, int device, std::uintptr_t stream);
}  // namespace cuda

}  // namespace tp
