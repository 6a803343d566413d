// cpu_kernels.h: the one table of CPU kernel entry points (optimizers, gradient norm, gradient
// buckets), one instance per instruction set, and the run-time choice between them
// (cpu_dispatch.cpp). bindings.cpp calls every CPU kernel through cpu_kernels(), so one rule (and
// one TRAINPATTERNS_SIMD cap) picks the instruction set of all of them.
#pragma once
#include "params.h"

namespace tp {

struct CpuKernels {
  const char* isa;  // "avx512", "avx2" or "scalar"
  void (*adam_step)(const TensorTable&, const AdamParams&, const GradControl&, int num_threads);
  void (*sgd_step)(const TensorTable&, const SgdParams&, const GradControl&, int num_threads);
  void (*adagrad_step)(const TensorTable&, const AdagradParams&, const GradControl&, int num_threads);
  // Sum of squares of every gradient of the table, accumulated in double. Not finite iff some
  // gradient element is not finite (double cannot overflow on squares of finite floats).
  double (*grad_sumsq)(const TensorTable&, int num_threads);
  // The gradient-bucket maths of BucketParams (params.h); threads split the concatenation evenly.
  void (*bucket_pack)(const BucketParams&, int num_threads);
  void (*bucket_unpack)(const BucketParams&, int num_threads);
};

// Each instruction set's table (cpu_kernel_table.cpp, compiled once per set).
namespace isa_scalar { const CpuKernels& kernels(); }
namespace isa_avx2 { const CpuKernels& kernels(); }
namespace isa_avx512 { const CpuKernels& kernels(); }

#ifdef TP_ISA
// Inside a per-instruction-set build: the entry points that this build's table gathers.
namespace TP_ISA {
void adam_step(const TensorTable&, const AdamParams&, const GradControl&, int num_threads);
void sgd_step(const TensorTable&, const SgdParams&, const GradControl&, int num_threads);
void adagrad_step(const TensorTable&, const AdagradParams&, const GradControl&, int num_threads);
double grad_sumsq(const TensorTable&, int num_threads);
void bucket_pack(const BucketParams&, int num_threads);
void bucket_unpack(const BucketParams&, int num_threads);
}  // namespace TP_ISA
#endif

// The best table this CPU supports among those compiled in; chosen once, at first use.
const CpuKernels& cpu_kernels();
// Whether OpenMP was compiled in.
bool cpu_openmp();

}  // namespace tp
