// adagrad_cpu.cpp: fused Adagrad step (lr_decay, weight decay, eps, maximize) on the CPU.
// Reference: torch.optim.Adagrad for-loop implementation.
#include "../common/cpu_isa.h"
#include "../common/cpu_kernels.h"

namespace tp {
namespace TP_ISA {
namespace {

template <typename P, typename S, bool MASTER, typename M>
static void adagrad_loop(P* __restrict param, const P* __restrict grad, S* __restrict sum,
                         float* __restrict master, int64_t b, int64_t e, M gm, M wd, M eps, M neg_clr) {
  for (int64_t j = b; j < e; ++j) {
    M g = to_op(grad[j]) * gm;                                // unscale, clip, maximize sign
    M p = MASTER ? static_cast<M>(master[j]) : static_cast<M>(to_op(param[j]));
    g = g + wd * p;                                           // L2 weight decay (wd = 0: none)
    const M s = to_op(sum[j]) + g * g;                        // sum += g^2
    sum[j] = Store<S>::from(s);
    const M stdv = op_sqrt(s) + eps;                          // std = sqrt(sum) + eps
    p = p + neg_clr * (g / stdv);                             // p -= clr * g / std
    if (MASTER) master[j] = static_cast<float>(p);
    param[j] = Store<P>::from(p);
  }
}

template <typename P, typename S, bool MASTER>
struct AdagradWorker {
  using M = typename OpMath<P>::type;
  const TensorTable& t;
  const AdagradParams& hp;
  double grad_mul;

  void operator()(int64_t i, int64_t b, int64_t e) {
    // clr = lr / (1 + (step - 1) * lr_decay), computed in double as torch does in Python.
    const double step = t.steps[i];
    const M neg_clr = static_cast<M>(-(hp.lr / (1.0 + (step - 1.0) * hp.lr_decay)));
    adagrad_loop<P, S, MASTER>(row_ptr<P>(t, kParam, i), row_ptr<const P>(t, kGrad, i), row_ptr<S>(t, kState0, i),
                               row_ptr<float>(t, kMaster, i), b, e,
                               static_cast<M>(grad_mul * (hp.maximize ? -1.0 : 1.0)),
                               static_cast<M>(hp.weight_decay), static_cast<M>(hp.eps), neg_clr);
  }
};

}  // namespace

void adagrad_step(const TensorTable& t, const AdagradParams& hp, const GradControl& gc, int num_threads) {
  for (int64_t i = 0; i < t.n; ++i) t.steps[i] += 1.0f;
  dispatch_types(t, [&](auto p_tag, auto s_tag, auto master) {
    using P = decltype(p_tag);
    using S = decltype(s_tag);
    constexpr bool kMaster = decltype(master)::value;
    for_each_piece(t, num_threads, [&] { return AdagradWorker<P, S, kMaster>{t, hp, gc.grad_mul}; });
  });
}

}  // namespace TP_ISA
}  // namespace tp
