// The argument checks ppo_losses_forward's and ppo_losses_backward's CPU (csrc/cpu/ppo_loss.cpp) and CUDA
// (csrc/cuda/ppo_loss.cpp) implementations share: everything but the device.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace rlhf_fast {

// Returns whether the value tensors are given (all three or none).
inline bool check_ppo_losses_args(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                  const at::Tensor& advantages, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& old_values,
                                  const std::optional<at::Tensor>& returns) {
  TORCH_CHECK(logprobs.dim() == 2, "ppo_losses: logprobs must be [B, T]");
  const auto given = [](const std::optional<at::Tensor>& tensor) { return tensor.has_value() && tensor->defined(); };
  const bool has_values = given(values);
  TORCH_CHECK(has_values == given(old_values) && has_values == given(returns),
              "ppo_losses: values, old_values and returns must be given together");
  const auto check_like_logprobs = [&](const at::Tensor& tensor, const char* name) {
    TORCH_CHECK(tensor.sizes() == logprobs.sizes(), "ppo_losses: ", name, " must have the shape of logprobs");
    TORCH_CHECK(tensor.scalar_type() == logprobs.scalar_type(), "ppo_losses: ", name,
                " must have the dtype of logprobs");
  };
  check_like_logprobs(old_logprobs, "old_logprobs");
  check_like_logprobs(advantages, "advantages");
  TORCH_CHECK(mask.sizes() == logprobs.sizes(), "ppo_losses: mask must have the shape of logprobs");
  if (has_values) {
    check_like_logprobs(*values, "values");
    check_like_logprobs(*old_values, "old_values");
    check_like_logprobs(*returns, "returns");
  }
  return has_values;
}

}  // namespace rlhf_fast
