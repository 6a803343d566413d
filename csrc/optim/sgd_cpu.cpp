// sgd_cpu.cpp: fused SGD step (momentum, dampening, nesterov, weight decay, maximize) on the CPU.
// Reference: torch.optim.SGD for-loop implementation. A tensor whose step count is still 0 has no
// momentum history: its buffer is initialised to the gradient, as torch clones it.
#include "../common/cpu_isa.h"
#include "../common/cpu_kernels.h"

namespace tp {
namespace TP_ISA {
namespace {

template <typename P, typename S>
struct SgdWorker {
  const TensorTable& t;
  const SgdParams& hp;
  double grad_mul;

  void operator()(int64_t i, int64_t b, int64_t e) {
    using M = typename OpMath<P>::type;
    P* __restrict param = row_ptr<P>(t, kParam, i);
    const P* __restrict grad = row_ptr<const P>(t, kGrad, i);
    S* __restrict buf = row_ptr<S>(t, kState0, i);
    float* __restrict master = row_ptr<float>(t, kMaster, i);
    const bool has_master = master != nullptr;
    const bool use_momentum = hp.momentum != 0.0;
    const bool first = t.steps[i] == 1.0f;  // steps were incremented before the pass
    const bool nesterov = hp.nesterov != 0;
    const bool use_wd = hp.weight_decay != 0.0;
    const M gm = static_cast<M>(grad_mul * (hp.maximize ? -1.0 : 1.0));
    const M wd = static_cast<M>(hp.weight_decay), mom = static_cast<M>(hp.momentum);
    const M one_minus_damp = static_cast<M>(1.0 - hp.dampening);
    const M neg_lr = static_cast<M>(-hp.lr);

    for (int64_t j = b; j < e; ++j) {
      M g = to_op(grad[j]) * gm;                             // unscale, clip, maximize sign
      M p = has_master ? static_cast<M>(master[j]) : static_cast<M>(to_op(param[j]));
      if (use_wd) g = g + wd * p;                            // L2 weight decay
      if (use_momentum) {
        // buf = g on the first step, else momentum * buf + (1 - dampening) * g
        const M bn = first ? g : to_op(buf[j]) * mom + one_minus_damp * g;
        buf[j] = Store<S>::from(bn);
        g = nesterov ? g + mom * bn : bn;                    // nesterov looks one step ahead
      }
      p = p + neg_lr * g;                                    // p -= lr * g
      if (has_master) master[j] = static_cast<float>(p);
      param[j] = Store<P>::from(p);
    }
  }
};

}  // namespace

void sgd_step(const TensorTable& t, const SgdParams& hp, const GradControl& gc, int num_threads) {
  for (int64_t i = 0; i < t.n; ++i) t.steps[i] += 1.0f;
  dispatch_types(t, [&](auto p_tag, auto s_tag) {
    using P = decltype(p_tag);
    using S = decltype(s_tag);
    for_each_piece(t, num_threads, [&] { return SgdWorker<P, S>{t, hp, gc.grad_mul}; });
  });
}

}  // namespace TP_ISA
}  // namespace tp
