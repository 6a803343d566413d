// cpu_dispatch.cpp: picks the widest instruction set this CPU supports among those compiled in,
// so one wheel runs everywhere and uses AVX-512 where it exists. Compiled with baseline flags.
#include <cstdlib>
#include <cstring>

#include "cpu_kernels.h"

namespace tp {

static const CpuKernels& choose() {
  // TRAINPATTERNS_SIMD=scalar|avx2|avx512 caps the choice (for tests and benchmarks).
  const char* cap = std::getenv("TRAINPATTERNS_SIMD");
  const bool allow_avx512 = !cap || std::strcmp(cap, "avx512") == 0;
  const bool allow_avx2 = allow_avx512 || (cap && std::strcmp(cap, "avx2") == 0);
#if defined(TP_HAVE_X86_ISAS)
  __builtin_cpu_init();
  if (allow_avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return isa_avx512::kernels();
  if (allow_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return isa_avx2::kernels();
#else
  (void)allow_avx512;
  (void)allow_avx2;
#endif
  return isa_scalar::kernels();
}

const CpuKernels& cpu_kernels() {
  static const CpuKernels& chosen = choose();
  return chosen;
}

bool cpu_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace tp
