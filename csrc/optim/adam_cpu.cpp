// adam_cpu.cpp: fused Adam / AdamW step on the CPU, one pass over memory per tensor list.
// Reference: torch.optim.Adam/AdamW for-loop implementation (tests/test_optim.py compares).
// Compiled once per instruction set (see CMakeLists.txt); the loop is written so the compiler
// vectorises it: options are template parameters, no branches on data.
#include <cmath>

#include "../common/cpu_isa.h"
#include "../common/cpu_kernels.h"

namespace tp {
namespace TP_ISA {
namespace {

// Loop-invariant scalars of one tensor's update, in the math type M.
template <typename M>
struct AdamScalars {
  M gm, decay, l2, lerp_coef, beta2, one_minus_beta2, eps, neg_step_size, bc2s;
  bool lerp_low;
};

template <typename P, typename S, bool MASTER, bool AMSGRAD, typename M>
static void adam_loop(P* __restrict param, const P* __restrict grad, S* __restrict m, S* __restrict v,
                      S* __restrict vmax, float* __restrict master, int64_t b, int64_t e,
                      const AdamScalars<M>& c) {
  for (int64_t j = b; j < e; ++j) {
    M g = to_op(grad[j]) * c.gm;                               // unscale, clip, maximize sign
    M p = MASTER ? static_cast<M>(master[j]) : static_cast<M>(to_op(param[j]));
    g = g + c.l2 * p;                                          // Adam: L2 term (l2 = 0 for AdamW)
    p = p * c.decay;                                           // AdamW: decoupled decay (else 1)
    const M mo = to_op(m[j]);
    const M mn = (c.lerp_low ? mo : g) + c.lerp_coef * (g - mo);  // m = lerp(m, g, 1 - beta1)
    const M vn = to_op(v[j]) * c.beta2 + c.one_minus_beta2 * g * g;  // v = beta2 v + (1-beta2) g^2
    M vh = vn;
    if (AMSGRAD) {                                             // running max of v
      const M vm = to_op(vmax[j]);
      vh = vm > vn ? vm : vn;
      vmax[j] = Store<S>::from(vh);
    }
    const M denom = op_sqrt(vh) / c.bc2s + c.eps;              // sqrt(v_hat) / sqrt(bc2) + eps
    p = p + c.neg_step_size * (mn / denom);                    // p -= lr / bc1 * m / denom
    m[j] = Store<S>::from(mn);
    v[j] = Store<S>::from(vn);
    if (MASTER) master[j] = static_cast<float>(p);
    param[j] = Store<P>::from(p);
  }
}

template <typename P, typename S, bool MASTER>
struct AdamWorker {
  using M = typename OpMath<P>::type;
  const TensorTable& t;
  const AdamParams& hp;
  double grad_mul;
  // Per-thread cache of the bias corrections: every tensor of a list usually has the same step.
  double cached_step = -1.0;
  AdamScalars<M> c{};

  void operator()(int64_t i, int64_t b, int64_t e) {
    const double step = t.steps[i];
    if (step != cached_step) {
      cached_step = step;
      const double bc1 = 1.0 - std::pow(hp.beta1, step);     // bias corrections, in double
      const double bc2 = 1.0 - std::pow(hp.beta2, step);
      const double w1 = 1.0 - hp.beta1;
      // torch's lerp: m + w (g - m) for w < 0.5, else g - (1 - w)(g - m).
      c.lerp_low = w1 < 0.5;
      c.lerp_coef = static_cast<M>(c.lerp_low ? w1 : -(1.0 - w1));
      c.gm = static_cast<M>(grad_mul * (hp.maximize ? -1.0 : 1.0));
      c.decay = static_cast<M>(hp.decoupled ? 1.0 - hp.lr * hp.weight_decay : 1.0);
      c.l2 = static_cast<M>(hp.decoupled ? 0.0 : hp.weight_decay);
      c.beta2 = static_cast<M>(hp.beta2);
      c.one_minus_beta2 = static_cast<M>(1.0 - hp.beta2);
      c.eps = static_cast<M>(hp.eps);
      c.neg_step_size = static_cast<M>(-(hp.lr / bc1));
      c.bc2s = static_cast<M>(std::sqrt(bc2));
    }
    P* param = row_ptr<P>(t, kParam, i);
    const P* grad = row_ptr<const P>(t, kGrad, i);
    S* m = row_ptr<S>(t, kState0, i);
    S* v = row_ptr<S>(t, kState1, i);
    S* vmax = row_ptr<S>(t, kState2, i);
    float* master = row_ptr<float>(t, kMaster, i);
    if (hp.amsgrad)
      adam_loop<P, S, MASTER, true>(param, grad, m, v, vmax, master, b, e, c);
    else
      adam_loop<P, S, MASTER, false>(param, grad, m, v, vmax, master, b, e, c);
  }
};

}  // namespace

void adam_step(const TensorTable& t, const AdamParams& hp, const GradControl& gc, int num_threads) {
  for (int64_t i = 0; i < t.n; ++i) t.steps[i] += 1.0f;
  dispatch_types(t, [&](auto p_tag, auto s_tag, auto master) {
    using P = decltype(p_tag);
    using S = decltype(s_tag);
    constexpr bool kMaster = decltype(master)::value;
    for_each_piece(t, num_threads, [&] { return AdamWorker<P, S, kMaster>{t, hp, gc.grad_mul}; });
  });
}

}  // namespace TP_ISA
}  // namespace tp
