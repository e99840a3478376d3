// The argument checks ranking_loss_forward's and ranking_loss_backward's CPU (csrc/cpu/ranking.cpp) and CUDA
// (csrc/cuda/ranking.cpp) implementations share: everything but the device.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace rlhf_fast {

inline void check_ranking_completions(const at::Tensor& rewards, const std::optional<at::Tensor>& ranks,
                                      const std::optional<at::Tensor>& margins) {
  TORCH_CHECK(rewards.dim() == 1, "ranking_loss: rewards must be [ΣK]");
  TORCH_CHECK(!ranks || ranks->sizes() == rewards.sizes(), "ranking_loss: ranks must be shaped like rewards");
  TORCH_CHECK(!margins || margins->sizes() == rewards.sizes(), "ranking_loss: margins must be shaped like rewards");
}

inline void check_ranking_forward_args(const at::Tensor& rewards, const at::Tensor& group_sizes,
                                       const std::optional<at::Tensor>& ranks,
                                       const std::optional<at::Tensor>& margins) {
  check_ranking_completions(rewards, ranks, margins);
  TORCH_CHECK(group_sizes.dim() == 1, "ranking_loss: group_sizes must be [P]");
}

inline void check_ranking_backward_args(const at::Tensor& grad_loss, const at::Tensor& rewards,
                                        const std::optional<at::Tensor>& ranks,
                                        const std::optional<at::Tensor>& margins, const at::Tensor& prompt_weights,
                                        const at::Tensor& prompt_ends) {
  check_ranking_completions(rewards, ranks, margins);
  TORCH_CHECK(prompt_weights.dim() == 1 && prompt_ends.sizes() == prompt_weights.sizes(),
              "ranking_loss: prompt_weights and prompt_ends must both be [P]");
  TORCH_CHECK(grad_loss.numel() == 1, "ranking_loss: grad_loss must hold one value");
}

}  // namespace rlhf_fast
