// cpu_kernel_table.cpp: compiled once per instruction set; exposes that build's kernels as a table.
// TP_ISA (namespace) and TP_ISA_NAME (string) come from CMakeLists.txt.
#include "cpu_kernels.h"

namespace tp {
namespace TP_ISA {

const CpuKernels& kernels() {
  static const CpuKernels table{TP_ISA_NAME, &adam_step,   &sgd_step,      &adagrad_step,
                                &grad_sumsq, &bucket_pack, &bucket_unpack};
  return table;
}

}  // namespace TP_ISA
}  // namespace tp
