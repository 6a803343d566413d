// grad_norm_cpu.cpp: sum of squares of all gradients of a tensor table, for norm clipping and the
// finite check. Reads each gradient once; accumulates in double so the result is accurate and a
// non-finite sum means a non-finite gradient (squares of finite floats cannot overflow a double).
#include "../common/cpu_isa.h"
#include "../common/cpu_kernels.h"

namespace tp {
namespace TP_ISA {
namespace {

// Eight independent accumulators let the compiler keep several vector lanes busy.
constexpr int kLanes = 8;

template <typename P>
struct SumsqWorker {
  const TensorTable& t;
  double* out;  // this thread's slot

  void operator()(int64_t i, int64_t b, int64_t e) {
    const P* __restrict g = row_ptr<const P>(t, kGrad, i);
    double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = b;
    for (; j + kLanes <= e; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const double x = static_cast<double>(to_op(g[j + l]));
        acc[l] += x * x;                                     // sum of g^2, per lane
      }
    for (; j < e; ++j) {
      const double x = static_cast<double>(to_op(g[j]));
      acc[0] += x * x;
    }
    double s = 0;
    for (int l = 0; l < kLanes; ++l) s += acc[l];
    *out += s;
  }
};

}  // namespace

double grad_sumsq(const TensorTable& t, int num_threads) {
  // One slot per thread, each on its own cache line, summed in thread order (deterministic).
  constexpr int kMaxThreads = 256;
  alignas(64) double slots[kMaxThreads * 8] = {};
  const int nt = num_threads < 1 ? 1 : (num_threads > kMaxThreads ? kMaxThreads : num_threads);
  dispatch_types(t, [&](auto p_tag, auto, auto) {
    using P = decltype(p_tag);
    for_each_piece(t, nt, [&] {
#ifdef _OPENMP
      const int tid = omp_in_parallel() ? omp_get_thread_num() : 0;
#else
      const int tid = 0;
#endif
      return SumsqWorker<P>{t, &slots[tid * 8]};
    });
  });
  double total = 0;
  for (int k = 0; k < nt; ++k) total += slots[k * 8];
  return total;
}

}  // namespace TP_ISA
}  // namespace tp
