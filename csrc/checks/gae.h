// The argument checks gae_forward's CPU (csrc/cpu/gae.cpp) and CUDA (csrc/cuda/gae.cpp) implementations share.
#pragma once

#include <ATen/ATen.h>

namespace rlhf_fast {

inline void check_gae_args(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [B, T]");
  TORCH_CHECK(values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(),
              "rewards, values and mask must share one shape");
}

}  // namespace rlhf_fast
