// GAE on the CPU: one reverse pass per row, rows in parallel, optional whitening over all valid tokens.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks/gae.h"
#include "cpu/parallel.h"
#include "dtype.h"

namespace {

using rlhf_fast::cpu::grain_for;

// One thread's time per token of the recurrence and of the whitening pass (see cpu/parallel.h).
constexpr double kNanosecondsPerToken = 2.0;
constexpr double kNanosecondsPerWhitenedToken = 0.5;

template <typename scalar_t, typename acc_t>
void gae_rows(const scalar_t* rewards, const scalar_t* values, const bool* mask, acc_t* advantages,
              acc_t* returns, int64_t batch, int64_t steps, acc_t gamma, acc_t lam) {
  const acc_t decay = gamma * lam;
  at::parallel_for(0, batch, grain_for(kNanosecondsPerToken * steps), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * steps;
      // "next" is the row's next valid token; after the last one, value and advantage are 0.
      acc_t next_value = 0, next_advantage = 0;
      for (int64_t t = steps - 1; t >= 0; --t) {
        const int64_t i = offset + t;
        if (!mask[i]) {
          advantages[i] = 0;
          returns[i] = 0;
          continue;
        }
        const acc_t value = static_cast<acc_t>(values[i]);
        const acc_t delta = static_cast<acc_t>(rewards[i]) + gamma * next_value - value;
        next_advantage = delta + decay * next_advantage;
        next_value = value;
        advantages[i] = next_advantage;
        returns[i] = next_advantage + value;
      }
    }
  });
}

// Whitens the valid advantages in place: (A - mean) / sqrt(unbiased var + eps); masked stay 0.
template <typename acc_t>
void whiten_valid(acc_t* advantages, const bool* mask, int64_t numel, double eps) {
  double sum = 0, sum_sq = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < numel; ++i) {
    if (mask[i]) {
      const double a = advantages[i];
      sum += a;
      sum_sq += a * a;
      ++count;
    }
  }
  if (count == 0) return;
  const double mean = sum / count;
  const double var = count > 1 ? std::max(0.0, (sum_sq - sum * mean) / (count - 1)) : 0.0;
  const double inv_std = 1.0 / std::sqrt(var + eps);
  at::parallel_for(0, numel, grain_for(kNanosecondsPerWhitenedToken), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (mask[i]) advantages[i] = static_cast<acc_t>((advantages[i] - mean) * inv_std);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gae_forward_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                                   const at::Tensor& mask, double gamma, double lam,
                                                   bool whiten, double whiten_eps) {
  rlhf_fast::check_gae_args(rewards, values, mask);
  const auto rewards_c = rewards.contiguous();
  const auto values_c = values.to(rewards.scalar_type()).contiguous();
  const auto mask_c = mask.to(at::kBool).contiguous();
  const int64_t batch = rewards.size(0), steps = rewards.size(1);
  const auto out_dtype = rlhf_fast::accumulate_dtype(rewards.scalar_type());
  auto advantages = at::empty(rewards.sizes(), rewards.options().dtype(out_dtype));
  auto returns = at::empty(rewards.sizes(), rewards.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "gae_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    gae_rows<scalar_t, acc_t>(rewards_c.data_ptr<scalar_t>(), values_c.data_ptr<scalar_t>(),
                              mask_c.data_ptr<bool>(), advantages.data_ptr<acc_t>(), returns.data_ptr<acc_t>(),
                              batch, steps, static_cast<acc_t>(gamma), static_cast<acc_t>(lam));
    if (whiten) whiten_valid<acc_t>(advantages.data_ptr<acc_t>(), mask_c.data_ptr<bool>(), advantages.numel(),
                                        whiten_eps);
  });
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) { m.impl("gae_forward", &gae_forward_cpu); }
