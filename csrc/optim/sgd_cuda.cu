// sgd_cuda.cu: fused SGD step (momentum, dampening, nesterov, weight decay, maximize) on the GPU.
// The CUDA twin of sgd_cpu.cpp, same maths in the same order. A tensor whose step count is 1 after
// the increment has no momentum history: its buffer becomes the gradient, as torch clones it. The
// engine (tensor walk, vectorization, master weights, skip flag, step increment) is
// csrc/common/multi_tensor.cuh.
#include "../common/cuda_api.h"
#include "../common/multi_tensor.cuh"

namespace tp {
namespace cuda {
namespace {

template <typename M, bool MOMENTUM>
struct SgdOp {
  static constexpr int kStates = MOMENTUM ? 1 : 0;  // momentum_buffer
  static constexpr int kSlots = 1;

  // Step-independent constants in the math type.
  M wd, mom, one_minus_damp;
  bool nesterov;
  // Inputs of the per-tensor scalars.
  mt::StepInputs in;

  struct Scalars {
    M gm, neg_lr;
    bool first;
  };

  __device__ __forceinline__ Scalars scalars(float step_count) const {
    const double lr_now = in.lr_now();
    const double mul = in.grad_mul_now();
    Scalars c;
    c.gm = static_cast<M>(mul * in.sign);                 // unscale * clip * maximize sign
    c.neg_lr = static_cast<M>(-lr_now);
    c.first = step_count == 1.0f;                         // steps were incremented before the pass
    return c;
  }

  __device__ __forceinline__ void operator()(const Scalars& c, M g, M& p, M (&s)[kSlots]) const {
    g = g * c.gm;                                         // unscale, clip, maximize sign
    g = g + wd * p;                                       // L2 weight decay (wd = 0: none)
    if constexpr (MOMENTUM) {
      // buf = g on the first step, else momentum * buf + (1 - dampening) * g
      const M bn = c.first ? g : s[0] * mom + one_minus_damp * g;
      s[0] = bn;
      g = nesterov ? g + mom * bn : bn;                   // nesterov looks one step ahead
    }
    p = p + c.neg_lr * g;                                 // p -= lr * g
  }
};

template <typename M, bool MOMENTUM>
SgdOp<M, MOMENTUM> make_op(const TensorTable& t, const SgdParams& hp, const GradControl& gc) {
  SgdOp<M, MOMENTUM> op{};
  op.wd = static_cast<M>(hp.weight_decay);
  op.mom = static_cast<M>(hp.momentum);
  op.one_minus_damp = static_cast<M>(1.0 - hp.dampening);
  op.nesterov = hp.nesterov != 0;
  op.in = mt::step_inputs(t, hp, gc);
  return op;
}

}  // namespace

void sgd_step(const TensorTable& t, const SgdParams& hp, const GradControl& gc, int device,
              std::uintptr_t stream) {
  DeviceGuard guard(device);
  mt::launch_step(t, gc, stream, hp.momentum != 0.0, [&](auto m_tag, auto momentum) {
    return make_op<typename decltype(m_tag)::type, decltype(momentum)::value>(t, hp, gc);
  });
}

}  // namespace cuda
}  // namespace tp
