// cpu_kernels.h: the table of CPU kernel entry points, one table per instruction set, and the
// run-time choice between them (cpu_dispatch.cpp). bindings.cpp calls through cpu_kernels().
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
};

#define TP_DECLARE_ISA(ns)                                                                       \
  namespace ns {                                                                                 \
  void adam_step(const TensorTable&, const AdamParams&, const GradControl&, int);                \
  void sgd_step(const TensorTable&, const SgdParams&, const GradControl&, int);                  \
  void adagrad_step(const TensorTable&, const AdagradParams&, const GradControl&, int);          \
  double grad_sumsq(const TensorTable&, int);                                                    \
  const CpuKernels& kernels();                                                                   \
  }
TP_DECLARE_ISA(isa_scalar)
TP_DECLARE_ISA(isa_avx2)
TP_DECLARE_ISA(isa_avx512)
#undef TP_DECLARE_ISA

// The best table this CPU supports among those compiled in; chosen once, at first use.
const CpuKernels& cpu_kernels();
// Whether OpenMP was compiled in.
bool cpu_openmp();

}  // namespace tp
