// adam_cpu.cpp: fused Adam / AdamW step on the CPU, one pass over memory per tensor list.
// Reference: torch.optim.Adam/AdamW for-loop implementation (tests/test_optim.py compares).
// Compiled once per instruction set (see CMakeLists.txt); the loop is written so the compiler
// vectorises it: no branches on data, loop-invariant flags only.
#include <cmath>

#include "../common/cpu_isa.h"
#include "../common/cpu_kernels.h"

namespace tp {
namespace TP_ISA {
namespace {

template <typename P, typename S>
struct AdamWorker {
  const TensorTable& t;
  const AdamParams& hp;
  double grad_mul;
  // Per-thread cache of the bias corrections: every tensor of a list usually has the same step.
  double cached_step = -1.0, step_size = 0.0, bc2_sqrt = 1.0;

  void operator()(int64_t i, int64_t b, int64_t e) {
    using M = typename OpMath<P>::type;
    const double step = t.steps[i];
    if (step != cached_step) {
      cached_step = step;
      step_size = hp.lr / (1.0 - std::pow(hp.beta1, step));
      bc2_sqrt = std::sqrt(1.0 - std::pow(hp.beta2, step));
    }
    P* __restrict param = row_ptr<P>(t, kParam, i);
    const P* __restrict grad = row_ptr<const P>(t, kGrad, i);
    S* __restrict m = row_ptr<S>(t, kState0, i);
    S* __restrict v = row_ptr<S>(t, kState1, i);
    S* __restrict vmax = row_ptr<S>(t, kState2, i);
    float* __restrict master = row_ptr<float>(t, kMaster, i);

    const M gm = static_cast<M>(grad_mul * (hp.maximize ? -1.0 : 1.0));
    // AdamW shrinks the parameter before the update; Adam adds wd * p to the gradient instead.
    const M decay = static_cast<M>(hp.decoupled ? 1.0 - hp.lr * hp.weight_decay : 1.0);
    const M l2 = static_cast<M>(hp.weight_decay);
    const bool use_l2 = !hp.decoupled && hp.weight_decay != 0.0;
    // torch's lerp: m + w (g - m) for w < 0.5, else g - (1 - w)(g - m).
    const double w1 = 1.0 - hp.beta1;
    const bool lerp_low = w1 < 0.5;
    const M lerp_coef = static_cast<M>(lerp_low ? w1 : -(1.0 - w1));
    const M beta2 = static_cast<M>(hp.beta2), one_minus_beta2 = static_cast<M>(1.0 - hp.beta2);
    const M eps = static_cast<M>(hp.eps);
    const M neg_step_size = static_cast<M>(-step_size);
    const M bc2s = static_cast<M>(bc2_sqrt);
    const bool amsgrad = hp.amsgrad != 0;
    const bool has_master = master != nullptr;

    for (int64_t j = b; j < e; ++j) {
      M g = to_op(grad[j]) * gm;                                // unscale, clip, maximize sign
      M p = has_master ? static_cast<M>(master[j]) : static_cast<M>(to_op(param[j]));
      if (use_l2) g = g + l2 * p;                               // Adam: L2 term on the gradient
      p = p * decay;                                            // AdamW: decoupled decay
      const M mo = to_op(m[j]);
      const M mn = (lerp_low ? mo : g) + lerp_coef * (g - mo);  // m = lerp(m, g, 1 - beta1)
      const M vn = to_op(v[j]) * beta2 + one_minus_beta2 * g * g;  // v = beta2 v + (1-beta2) g^2
      M vh = vn;
      if (amsgrad) {                                            // running max of v
        const M vm = to_op(vmax[j]);
        vh = vm > vn ? vm : vn;
        vmax[j] = Store<S>::from(vh);
      }
      const M denom = op_sqrt(vh) / bc2s + eps;               // sqrt(v_hat) + eps
      p = p + neg_step_size * (mn / denom);                     // p -= lr/bc1 * m / denom
      m[j] = Store<S>::from(mn);
      v[j] = Store<S>::from(vn);
      if (has_master) master[j] = static_cast<float>(p);
      param[j] = Store<P>::from(p);
    }
  }
};

}  // namespace

void adam_step(const TensorTable& t, const AdamParams& hp, const GradControl& gc, int num_threads) {
  for (int64_t i = 0; i < t.n; ++i) t.steps[i] += 1.0f;
  dispatch_types(t, [&](auto p_tag, auto s_tag) {
    using P = decltype(p_tag);
    using S = decltype(s_tag);
    for_each_piece(t, num_threads, [&] { return AdamWorker<P, S>{t, hp, gc.grad_mul}; });
  });
}

}  // namespace TP_ISA
}  // namespace tp
