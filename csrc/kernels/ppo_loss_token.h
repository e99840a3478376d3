// The per-token math of the PPO losses, shared by the CPU kernel (csrc/cpu/ppo_loss.cpp) and the CUDA kernel
// (csrc/kernels/ppo_loss.cu) so the two cannot drift apart. Plain C++, no torch or CUDA headers.
// The formulas and their tie rules are those of rlhf_fast/ops/ppo_loss.py::ppo_losses_reference.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define RLHF_FAST_HOST_DEVICE __host__ __device__
#else
#define RLHF_FAST_HOST_DEVICE
#endif

namespace rlhf_fast::ppo_loss {

template <typename acc_t>
RLHF_FAST_HOST_DEVICE inline acc_t clamp_between(acc_t x, acc_t low, acc_t high) {
  // torch.clamp's order: max with low first, then min with high.
  const acc_t raised = x < low ? low : x;
  return raised > high ? high : raised;
}

template <typename acc_t>
struct PolicyToken {
  acc_t loss;           // max(-A·ratio, -A·clamp(ratio))
  acc_t ratio;          // exp(logprob - old_logprob)
  acc_t approx_kl;      // (ratio - 1) - log ratio
  bool clipped;         // the clipped term is strictly larger (it is the active one)
  acc_t grad_logprob;   // d loss / d logprob: -A·ratio where the unclipped term is active, else 0
};

template <typename acc_t>
RLHF_FAST_HOST_DEVICE inline PolicyToken<acc_t> policy_token(acc_t logprob, acc_t old_logprob, acc_t advantage,
                                                             acc_t ratio_low, acc_t ratio_high) {
  using std::exp;
  const acc_t log_ratio = logprob - old_logprob;
  const acc_t ratio = exp(log_ratio);
  const acc_t unclipped_loss = -advantage * ratio;
  // Inside the clip range the clamp returns ratio itself, so the two terms tie exactly.
  const acc_t clipped_loss = -advantage * clamp_between(ratio, ratio_low, ratio_high);
  PolicyToken<acc_t> token;
  token.clipped = clipped_loss > unclipped_loss;
  token.loss = token.clipped ? clipped_loss : unclipped_loss;
  token.ratio = ratio;
  token.approx_kl = (ratio - acc_t(1)) - log_ratio;
  token.grad_logprob = token.clipped ? acc_t(0) : unclipped_loss;
  return token;
}

template <typename acc_t>
struct ValueToken {
  acc_t loss;         // ½·max((V - R)², (V_clipped - R)²)
  bool clipped;       // the clipped term is strictly larger
  acc_t grad_value;   // d loss / d V: V - R where the unclipped term is active, else 0
};

template <typename acc_t>
RLHF_FAST_HOST_DEVICE inline ValueToken<acc_t> value_token(acc_t value, acc_t old_value, acc_t target,
                                                           acc_t value_clip) {
  const acc_t clipped_value = clamp_between(value, old_value - value_clip, old_value + value_clip);
  const acc_t error = value - target;
  const acc_t clipped_error = clipped_value - target;
  const acc_t unclipped_loss = error * error;
  const acc_t clipped_loss = clipped_error * clipped_error;
  ValueToken<acc_t> token;
  token.clipped = clipped_loss > unclipped_loss;
  token.loss = acc_t(0.5) * (token.clipped ? clipped_loss : unclipped_loss);
  token.grad_value = token.clipped ? acc_t(0) : error;
  return token;
}

}  // namespace rlhf_fast::ppo_loss
