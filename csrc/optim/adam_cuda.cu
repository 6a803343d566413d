// adam_cuda.cu: fused Adam / AdamW step on the GPU, one pass over memory for a whole tensor table.
// The CUDA twin of adam_cpu.cpp, with the same maths in the same order: scalars that do not depend
// on the step are rounded once on the host from doubles, bias corrections are computed per tensor
// on the device in double from the already incremented step count. The engine (tensor walk,
// vectorization, master weights, skip flag, step increment) is csrc/common/multi_tensor.cuh.
#include <cmath>

#include "../common/cuda_api.h"
#include "../common/multi_tensor.cuh"

namespace tp {
namespace cuda {
namespace {

using mt::op_div;
using mt::op_sqrt;

template <typename M, bool AMSGRAD>
struct AdamOp {
  static constexpr int kStates = AMSGRAD ? 3 : 2;  // exp_avg, exp_avg_sq [, max_exp_avg_sq]
  static constexpr int kSlots = kStates;

  // Step-independent constants in the math type.
  M l2, lerp_coef, beta2, one_minus_beta2, eps;
  bool lerp_low;
  // Inputs of the per-tensor scalars.
  mt::StepInputs in;
  double beta1_d, beta2_d, weight_decay;
  int decoupled;

  struct Scalars {
    M gm, decay, neg_step_size, bc2s;
  };

  __device__ __forceinline__ Scalars scalars(float step_count) const {
    const double step = step_count;                                  // already incremented
    const double lr_now = in.lr_now();
    const double mul = in.grad_mul_now();
    const double bc1 = 1.0 - pow(beta1_d, step);                     // bias corrections, in double
    const double bc2 = 1.0 - pow(beta2_d, step);
    Scalars c;
    c.gm = static_cast<M>(mul * in.sign);                            // unscale * clip * maximize sign
    c.decay = static_cast<M>(decoupled ? 1.0 - lr_now * weight_decay : 1.0);
    c.neg_step_size = static_cast<M>(-(lr_now / bc1));
    c.bc2s = static_cast<M>(sqrt(bc2));
    return c;
  }

  __device__ __forceinline__ void operator()(const Scalars& c, M g, M& p, M (&s)[kSlots]) const {
    g = g * c.gm;                                                  // unscale, clip, maximize sign
    g = g + l2 * p;                                                // Adam: L2 term (l2 = 0 for AdamW)
    p = p * c.decay;                                               // AdamW: decoupled decay (else 1)
    const M mo = s[0];
    const M mn = (lerp_low ? mo : g) + lerp_coef * (g - mo);       // m = lerp(m, g, 1 - beta1)
    const M vn = s[1] * beta2 + one_minus_beta2 * g * g;           // v = beta2 v + (1 - beta2) g^2
    M vh = vn;
    if constexpr (AMSGRAD) {                                       // running max of v
      vh = s[2] > vn ? s[2] : vn;
      s[2] = vh;
    }
    const M denom = op_div(op_sqrt(vh), c.bc2s) + eps;             // sqrt(v_hat) / sqrt(bc2) + eps
    p = p + c.neg_step_size * op_div(mn, denom);                   // p -= lr / bc1 * m / denom
    s[0] = mn;
    s[1] = vn;
  }
};

template <typename M, bool AMSGRAD>
AdamOp<M, AMSGRAD> make_op(const TensorTable& t, const AdamParams& hp, const GradControl& gc) {
  AdamOp<M, AMSGRAD> op{};
  const double w1 = 1.0 - hp.beta1;
  // torch's lerp: m + w (g - m) for w < 0.5, else g - (1 - w)(g - m).
  op.lerp_low = w1 < 0.5;
  op.lerp_coef = static_cast<M>(op.lerp_low ? w1 : -(1.0 - w1));
  op.l2 = static_cast<M>(hp.decoupled ? 0.0 : hp.weight_decay);
  op.beta2 = static_cast<M>(hp.beta2);
  op.one_minus_beta2 = static_cast<M>(1.0 - hp.beta2);
  op.eps = static_cast<M>(hp.eps);
  op.in = mt::step_inputs(t, hp, gc);
  op.beta1_d = hp.beta1;
  op.beta2_d = hp.beta2;
  op.weight_decay = hp.weight_decay;
  op.decoupled = hp.decoupled;
  return op;
}

}  // namespace

void adam_step(const TensorTable& t, const AdamParams& hp, const GradControl& gc, int device,
               std::uintptr_t stream) {
  DeviceGuard guard(device);
  mt::launch_step(t, gc, stream, hp.amsgrad != 0, [&](auto m_tag, auto amsgrad) {
    return make_op<typename decltype(m_tag)::type, decltype(amsgrad)::value>(t, hp, gc);
  });
}

}  // namespace cuda
}  // namespace tp
