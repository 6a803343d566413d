// adagrad_cuda.cu: fused Adagrad step (lr_decay, weight decay, eps, maximize) on the GPU.
// The CUDA twin of adagrad_cpu.cpp, same maths in the same order; the decayed learning rate is
// computed per tensor on the device in double from the already incremented step count. The engine
// (tensor walk, vectorization, master weights, skip flag, step increment) is
// csrc/common/multi_tensor.cuh.
#include "../common/cuda_api.h"
#include "../common/multi_tensor.cuh"

namespace tp {
namespace cuda {
namespace {

using mt::op_div;
using mt::op_sqrt;

template <typename M>
struct AdagradOp {
  static constexpr int kStates = 1;  // sum of squared gradients
  static constexpr int kSlots = 1;

  // Step-independent constants in the math type.
  M wd, eps;
  // Inputs of the per-tensor scalars.
  mt::StepInputs in;
  double lr_decay;

  struct Scalars {
    M gm, neg_clr;
  };

  __device__ __forceinline__ Scalars scalars(float step_count) const {
    const double step = step_count;                        // already incremented
    const double lr_now = in.lr_now();
    const double mul = in.grad_mul_now();
    Scalars c;
    c.gm = static_cast<M>(mul * in.sign);                  // unscale * clip * maximize sign
    c.neg_clr = static_cast<M>(-(lr_now / (1.0 + (step - 1.0) * lr_decay)));  // clr, in double
    return c;
  }

  __device__ __forceinline__ void operator()(const Scalars& c, M g, M& p, M (&s)[kSlots]) const {
    g = g * c.gm;                                          // unscale, clip, maximize sign
    g = g + wd * p;                                        // L2 weight decay (wd = 0: none)
    s[0] = s[0] + g * g;                                   // sum += g^2
    const M stdv = op_sqrt(s[0]) + eps;                    // std = sqrt(sum) + eps
    p = p + c.neg_clr * op_div(g, stdv);                   // p -= clr * g / std
  }
};

template <typename M>
AdagradOp<M> make_op(const TensorTable& t, const AdagradParams& hp, const GradControl& gc) {
  AdagradOp<M> op{};
  op.wd = static_cast<M>(hp.weight_decay);
  op.eps = static_cast<M>(hp.eps);
  op.in = mt::step_inputs(t, hp, gc);
  op.lr_decay = hp.lr_decay;
  return op;
}

}  // namespace

void adagrad_step(const TensorTable& t, const AdagradParams& hp, const GradControl& gc, int device,
                  std::uintptr_t stream) {
  DeviceGuard guard(device);
  mt::launch_step(t, gc, stream, false, [&](auto m_tag, auto) { return make_op<typename decltype(m_tag)::type>(t, hp, gc); });
}

}  // namespace cuda
}  // namespace tp
