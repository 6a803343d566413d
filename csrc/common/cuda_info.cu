// cuda_info.cu: what the CUDA part of the module was built with and what it finds at run time,
// for trainpatterns._C.build_info(). device_count never throws: the module links the CUDA runtime
// statically so that it imports on machines with no driver or GPU, where it reports 0 devices and
// the Python side uses the CPU kernels.
#include <cuda_runtime_api.h>

#include "cuda_api.h"

#ifndef TP_CUDA_ARCHS
#define TP_CUDA_ARCHS ""
#endif

namespace tp {
namespace cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it, so that no later check reports this expected failure
    return 0;
  }
  return count;
}

std::string compiled_archs() { return TP_CUDA_ARCHS; }

int runtime_version() {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) {
    (void)cudaGetLastError();
    return CUDART_VERSION;
  }
  return version;
}

}  // namespace cuda
}  // namespace tp
