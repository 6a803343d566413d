// adagrad_cpu.cpp: fused Adagrad step (lr_decay, weight decay, eps, maximize) on the CPU.
// Reference: torch.optim.Adagrad for-loop implementation.
#include "../common/cpu_isa.h"
#include "../common/cpu_kernels.h"

namespace tp {
namespace TP_ISA {
namespace {

template <typename P, typename S>
struct AdagradWorker {
  const TensorTable& t;
  const AdagradParams& hp;
  double grad_mul;

  void operator()(int64_t i, int64_t b, int64_t e) {
    using M = typename OpMath<P>::type;
    P* __restrict param = row_ptr<P>(t, kParam, i);
    const P* __restrict grad = row_ptr<const P>(t, kGrad, i);
    S* __restrict sum = row_ptr<S>(t, kState0, i);
    float* __restrict master = row_ptr<float>(t, kMaster, i);
    const bool has_master = master != nullptr;
    const bool use_wd = hp.weight_decay != 0.0;
    const M gm = static_cast<M>(grad_mul * (hp.maximize ? -1.0 : 1.0));
    const M wd = static_cast<M>(hp.weight_decay), eps = static_cast<M>(hp.eps);
    // clr = lr / (1 + (step - 1) * lr_decay), computed in double as torch does in Python.
    const double step = t.steps[i];
    const M neg_clr = static_cast<M>(-(hp.lr / (1.0 + (step - 1.0) * hp.lr_decay)));

    for (int64_t j = b; j < e; ++j) {
      M g = to_op(grad[j]) * gm;                             // unscale, clip, maximize sign
      M p = has_master ? static_cast<M>(master[j]) : static_cast<M>(to_op(param[j]));
      if (use_wd) g = g + wd * p;                            // L2 weight decay
      const M s = to_op(sum[j]) + g * g;                     // sum += g^2
      sum[j] = Store<S>::from(s);
      const M stdv = op_sqrt(s) + eps;                       // std = sqrt(sum) + eps
      p = p + neg_clr * (g / stdv);                          // p -= clr * g / std
      if (has_master) master[j] = static_cast<float>(p);
      param[j] = Store<P>::from(p);
    }
  }
};

}  // namespace

void adagrad_step(const TensorTable& t, const AdagradParams& hp, const GradControl& gc, int num_threads) {
  for (int64_t i = 0; i < t.n; ++i) t.steps[i] += 1.0f;
  dispatch_types(t, [&](auto p_tag, auto s_tag) {
    using P = decltype(p_tag);
    using S = decltype(s_tag);
    for_each_piece(t, num_threads, [&] { return AdagradWorker<P, S>{t, hp, gc.grad_mul}; });
  });
}

}  // namespace TP_ISA
}  // namespace tp
