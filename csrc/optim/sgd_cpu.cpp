// sgd_cpu.cpp: fused SGD step (momentum, dampening, nesterov, weight decay, maximize) on the CPU.
// Reference: torch.optim.SGD for-loop implementation. A tensor whose step count is still 0 has no
// momentum history: its buffer is initialised to the gradient, as torch clones it.
#include "../common/cpu_isa.h"
#include "../common/cpu_kernels.h"

namespace tp {
namespace TP_ISA {
namespace {

template <typename M>
struct SgdScalars {
  M gm, wd, mom, one_minus_damp, neg_lr;
  bool first, nesterov;
};

template <typename P, typename S, bool MASTER, bool MOMENTUM, typename M>
static void sgd_loop(P* __restrict param, const P* __restrict grad, S* __restrict buf, float* __restrict master,
                     int64_t b, int64_t e, const SgdScalars<M>& c) {
  for (int64_t j = b; j < e; ++j) {
    M g = to_op(grad[j]) * c.gm;                              // unscale, clip, maximize sign
    M p = MASTER ? static_cast<M>(master[j]) : static_cast<M>(to_op(param[j]));
    g = g + c.wd * p;                                         // L2 weight decay (wd = 0: none)
    if (MOMENTUM) {
      // buf = g on the first step, else momentum * buf + (1 - dampening) * g
      const M bn = c.first ? g : to_op(buf[j]) * c.mom + c.one_minus_damp * g;
      buf[j] = Store<S>::from(bn);
      g = c.nesterov ? g + c.mom * bn : bn;                   // nesterov looks one step ahead
    }
    p = p + c.neg_lr * g;                                     // p -= lr * g
    if (MASTER) master[j] = static_cast<float>(p);
    param[j] = Store<P>::from(p);
  }
}

template <typename P, typename S, bool MASTER>
struct SgdWorker {
  using M = typename OpMath<P>::type;
  const TensorTable& t;
  const SgdParams& hp;
  double grad_mul;

  void operator()(int64_t i, int64_t b, int64_t e) {
    SgdScalars<M> c;
    c.gm = static_cast<M>(grad_mul * (hp.maximize ? -1.0 : 1.0));
    c.wd = static_cast<M>(hp.weight_decay);
    c.mom = static_cast<M>(hp.momentum);
    c.one_minus_damp = static_cast<M>(1.0 - hp.dampening);
    c.neg_lr = static_cast<M>(-hp.lr);
    c.first = t.steps[i] == 1.0f;  // steps were incremented before the pass
    c.nesterov = hp.nesterov != 0;
    P* param = row_ptr<P>(t, kParam, i);
    const P* grad = row_ptr<const P>(t, kGrad, i);
    S* buf = row_ptr<S>(t, kState0, i);
    float* master = row_ptr<float>(t, kMaster, i);
    if (hp.momentum != 0.0)
      sgd_loop<P, S, MASTER, true>(param, grad, buf, master, b, e, c);
    else
      sgd_loop<P, S, MASTER, false>(param, grad, buf, master, b, e, c);
  }
};

}  // namespace

void sgd_step(const TensorTable& t, const SgdParams& hp, const GradControl& gc, int num_threads) {
  for (int64_t i = 0; i < t.n; ++i) t.steps[i] += 1.0f;
  dispatch_types(t, [&](auto p_tag, auto s_tag, auto master) {
    using P = decltype(p_tag);
    using S = decltype(s_tag);
    constexpr bool kMaster = decltype(master)::value;
    for_each_piece(t, num_threads, [&] { return SgdWorker<P, S, kMaster>{t, hp, gc.grad_mul}; });
  });
}

}  // namespace TP_ISA
}  // namespace tp
