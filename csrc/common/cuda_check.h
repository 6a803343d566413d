// cuda_check.h: error handling and device selection for the host side of the CUDA kernels.
// Every CUDA runtime call and every launch is checked with TP_CUDA_CHECK, which turns a failure into
// std::runtime_error carrying the CUDA error name and message (pybind11 shows it as RuntimeError).
// DeviceGuard makes `device` current for the duration of a call and restores the caller's device,
// as torch's CUDAGuard does; both calls are legal during CUDA graph capture.
#pragma once
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace tp {
namespace cuda {

inline void check(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return;
  throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                           ") in " + what + " at " + file + ":" + std::to_string(line));
}

// Checks the last launch on this thread (a bad configuration shows up here, not at the launch).
inline void check_launch(const char* kernel, const char* file, int line) {
  check(cudaGetLastError(), kernel, file, line);
}

#define TP_CUDA_CHECK(expr) ::tp::cuda::check((expr), #expr, __FILE__, __LINE__)
#define TP_CUDA_CHECK_LAUNCH(kernel) ::tp::cuda::check_launch(kernel, __FILE__, __LINE__)

// Makes `device` the current device; the destructor restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    TP_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) {
      TP_CUDA_CHECK(cudaSetDevice(device));
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    // A destructor must not throw: a failure to switch back stays in the runtime's last-error
    // state, where the next TP_CUDA_CHECK_LAUNCH reports it.
    if (changed_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

}  // namespace cuda
}  // namespace tp
