// PPO clipped losses on the CPU. Forward: one pass over the tokens; each fixed-size chunk sums its tokens in
// double, then the chunk sums are added in order, so the result does not depend on the thread count.
// Backward: one elementwise pass that recomputes the ratio instead of saving a [B, T] tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks/ppo_loss.h"
#include "cpu/parallel.h"
#include "dtype.h"
#include "kernels/ppo_loss_token.h"

namespace {

using rlhf_fast::cpu::grain_for;

using rlhf_fast::ppo_loss::policy_token;
using rlhf_fast::ppo_loss::value_token;

constexpr int64_t kTokensPerChunk = 4096;
// One thread's time per token of the forward sums and of each gradient pass (see cpu/parallel.h).
constexpr double kNanosecondsPerToken = 5.0;

struct Sums {
  double policy_loss = 0, approx_kl = 0, ratio = 0, value_loss = 0;
  int64_t clipped = 0, value_clipped = 0, valid = 0;

  void add(const Sums& other) {
    policy_loss += other.policy_loss;
    approx_kl += other.approx_kl;
    ratio += other.ratio;
    value_loss += other.value_loss;
    clipped += other.clipped;
    value_clipped += other.value_clipped;
    valid += other.valid;
  }
};

// The op's inputs made contiguous, in one dtype, with the mask as bool; the value tensors are undefined
// when the value loss is off.
struct Inputs {
  at::Tensor logprobs, old_logprobs, advantages, mask, values, old_values, returns;
  bool has_values() const { return values.defined(); }
};

Inputs prepare_inputs(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                      const at::Tensor& mask, const std::optional<at::Tensor>& values,
                      const std::optional<at::Tensor>& old_values, const std::optional<at::Tensor>& returns) {
  const bool has_values =
      rlhf_fast::check_ppo_losses_args(logprobs, old_logprobs, advantages, mask, values, old_values, returns);
  Inputs in;
  in.logprobs = logprobs.contiguous();
  in.old_logprobs = old_logprobs.contiguous();
  in.advantages = advantages.contiguous();
  in.mask = mask.to(at::kBool).contiguous();
  if (has_values) {
    in.values = values->contiguous();
    in.old_values = old_values->contiguous();
    in.returns = returns->contiguous();
  }
  return in;
}

template <typename scalar_t, typename acc_t, bool kHasValues>
Sums sum_tokens(const Inputs& in, int64_t begin, int64_t end, acc_t ratio_low, acc_t ratio_high,
                acc_t value_clip) {
  const scalar_t* logprobs = in.logprobs.const_data_ptr<scalar_t>();
  const scalar_t* old_logprobs = in.old_logprobs.const_data_ptr<scalar_t>();
  const scalar_t* advantages = in.advantages.const_data_ptr<scalar_t>();
  const bool* mask = in.mask.const_data_ptr<bool>();
  const scalar_t* values = kHasValues ? in.values.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* old_values = kHasValues ? in.old_values.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* returns = kHasValues ? in.returns.const_data_ptr<scalar_t>() : nullptr;
  Sums sums;
  for (int64_t i = begin; i < end; ++i) {
    if (!mask[i]) continue;
    const auto policy = policy_token<acc_t>(static_cast<acc_t>(logprobs[i]), static_cast<acc_t>(old_logprobs[i]),
                                            static_cast<acc_t>(advantages[i]), ratio_low, ratio_high);
    sums.policy_loss += policy.loss;
    sums.approx_kl += policy.approx_kl;
    sums.ratio += policy.ratio;
    sums.clipped += policy.clipped;
    sums.valid += 1;
    if constexpr (kHasValues) {
      const auto value = value_token<acc_t>(static_cast<acc_t>(values[i]), static_cast<acc_t>(old_values[i]),
                                            static_cast<acc_t>(returns[i]), value_clip);
      sums.value_loss += value.loss;
      sums.value_clipped += value.clipped;
    }
  }
  return sums;
}

template <typename scalar_t, typename acc_t, bool kHasValues>
Sums sum_all_tokens(const Inputs& in, double clip_coef, double value_clip) {
  const int64_t numel = in.logprobs.numel();
  const int64_t chunks = (numel + kTokensPerChunk - 1) / kTokensPerChunk;
  std::vector<Sums> chunk_sums(chunks);
  at::parallel_for(0, chunks, grain_for(kNanosecondsPerToken * kTokensPerChunk), [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const int64_t begin = chunk * kTokensPerChunk;
      chunk_sums[chunk] = sum_tokens<scalar_t, acc_t, kHasValues>(
          in, begin, std::min(begin + kTokensPerChunk, numel), static_cast<acc_t>(1.0 - clip_coef),
          static_cast<acc_t>(1.0 + clip_coef), static_cast<acc_t>(value_clip));
    }
  });
  Sums total;
  for (const Sums& sums : chunk_sums) total.add(sums);
  return total;
}

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardOutputs ppo_losses_forward_cpu(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                      const at::Tensor& advantages, const at::Tensor& mask,
                                      const std::optional<at::Tensor>& values,
                                      const std::optional<at::Tensor>& old_values,
                                      const std::optional<at::Tensor>& returns, double clip_coef,
                                      double value_clip) {
  const Inputs in = prepare_inputs(logprobs, old_logprobs, advantages, mask, values, old_values, returns);
  Sums sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logprobs.scalar_type(), "ppo_losses_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    sums = in.has_values() ? sum_all_tokens<scalar_t, acc_t, true>(in, clip_coef, value_clip)
                           : sum_all_tokens<scalar_t, acc_t, false>(in, clip_coef, value_clip);
  });
  // An all-masked batch divides zeros by 1: every output is 0, never NaN.
  const double inverse_count = 1.0 / static_cast<double>(std::max<int64_t>(sums.valid, 1));
  const auto options = logprobs.options().dtype(rlhf_fast::accumulate_dtype(logprobs.scalar_type()));
  auto mean = [&](double sum) { return at::scalar_tensor(sum * inverse_count, options); };
  return {mean(sums.policy_loss),
          mean(static_cast<double>(sums.clipped)),
          mean(sums.approx_kl),
          mean(sums.ratio),
          mean(sums.value_loss),
          mean(static_cast<double>(sums.value_clipped)),
          at::scalar_tensor(sums.valid, logprobs.options().dtype(at::kLong))};
}

// The backward pass of a per-token loss of three inputs a, b, c: grad[i] = scale · token_grad(a[i], b[i], c[i])
// on the valid tokens and 0 on the masked ones.
template <typename scalar_t, typename acc_t, typename TokenGrad>
void masked_gradient(const at::Tensor& mask, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                     acc_t scale, const TokenGrad& token_grad, scalar_t* grad) {
  const scalar_t* a_data = a.const_data_ptr<scalar_t>();
  const scalar_t* b_data = b.const_data_ptr<scalar_t>();
  const scalar_t* c_data = c.const_data_ptr<scalar_t>();
  const bool* valid = mask.const_data_ptr<bool>();
  at::parallel_for(0, a.numel(), grain_for(kNanosecondsPerToken), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t value = 0;
      if (valid[i]) {
        value = scale * token_grad(static_cast<acc_t>(a_data[i]), static_cast<acc_t>(b_data[i]),
                                   static_cast<acc_t>(c_data[i]));
      }
      grad[i] = static_cast<scalar_t>(value);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> ppo_losses_backward_cpu(
    const at::Tensor& grad_policy_loss, const at::Tensor& grad_value_loss, const at::Tensor& logprobs,
    const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& old_values,
    const std::optional<at::Tensor>& returns, const at::Tensor& valid_count, double clip_coef, double value_clip) {
  const Inputs in = prepare_inputs(logprobs, old_logprobs, advantages, mask, values, old_values, returns);
  // d mean / d token = 1 / count; an all-masked batch has no token to receive it.
  const double inverse_count = 1.0 / static_cast<double>(std::max<int64_t>(valid_count.item<int64_t>(), 1));
  auto grad_logprobs = at::empty(logprobs.sizes(), logprobs.options());
  auto grad_values = in.has_values() ? at::empty(logprobs.sizes(), logprobs.options())
                                     : at::empty({0}, logprobs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logprobs.scalar_type(), "ppo_losses_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto ratio_low = static_cast<acc_t>(1.0 - clip_coef), ratio_high = static_cast<acc_t>(1.0 + clip_coef);
    const auto policy_grad = [&](acc_t logprob, acc_t old_logprob, acc_t advantage) {
      return policy_token<acc_t>(logprob, old_logprob, advantage, ratio_low, ratio_high).grad_logprob;
    };
    masked_gradient(in.mask, in.logprobs, in.old_logprobs, in.advantages,
                    static_cast<acc_t>(grad_policy_loss.item<double>() * inverse_count), policy_grad,
                    grad_logprobs.mutable_data_ptr<scalar_t>());
    if (in.has_values()) {
      const auto clip = static_cast<acc_t>(value_clip);
      const auto value_grad = [&](acc_t value, acc_t old_value, acc_t target) {
        return value_token<acc_t>(value, old_value, target, clip).grad_value;
      };
      masked_gradient(in.mask, in.values, in.old_values, in.returns,
                      static_cast<acc_t>(grad_value_loss.item<double>() * inverse_count), value_grad,
                      grad_values.mutable_data_ptr<scalar_t>());
    }
  });
  return {grad_logprobs, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("ppo_losses_forward", &ppo_losses_forward_cpu);
  m.impl("ppo_losses_backward", &ppo_losses_backward_cpu);
}
