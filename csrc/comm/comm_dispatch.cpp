// comm_dispatch.cpp: picks the bucket kernels of the instruction set that the optimizer kernels'
// dispatch (csrc/common/cpu_dispatch.cpp) chose, so one rule (and one TRAINPATTERNS_SIMD cap)
// governs every CPU kernel. Compiled with baseline flags.
#include <cstring>

#include "../common/cpu_kernels.h"
#include "comm_kernels.h"

namespace tp {

static const CommCpuKernels& choose_comm() {
#if defined(TP_HAVE_X86_ISAS)
  const char* isa = cpu_kernels().isa;
  if (std::strcmp(isa, "avx512") == 0) return isa_avx512::comm_kernels();
  if (std::strcmp(isa, "avx2") == 0) return isa_avx2::comm_kernels();
#endif
  return isa_scalar::comm_kernels();
}

const CommCpuKernels& comm_cpu_kernels() {
  static const CommCpuKernels& chosen = choose_comm();
  return chosen;
}

}  // namespace tp
