// PPO clipped losses on the GPU: raw pointers and a stream, no torch headers.
//
// Forward, one launch: masked means over the valid tokens of a [B, T] batch of
//   policy_loss, clipfrac, approx_kl, ratio_mean, value_loss, value_clipfrac
// and the number of valid tokens. Blocks publish partial sums; the last block to finish adds them in a
// fixed order, so the result is the same on every run. Backward, one launch: elementwise gradients with
// respect to logprobs and values, scaled by the upstream gradients / the forward's valid count.
// Per-token math: csrc/kernels/ppo_loss_token.h (shared with the CPU kernel).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/input_type.h"

namespace rlhf_fast {

// Index of each input in PpoLossProblem::strides.
enum PpoTensor : int { kLogprobs = 0, kOldLogprobs, kAdvantages, kMask, kValues, kOldValues, kReturns, kNumTensors };

struct PpoLossProblem {
  // [B, T] inputs sharing `input_type` (the mask is bool); values, old_values and returns are all null when
  // the value loss is off.
  const void* logprobs;
  const void* old_logprobs;
  const void* advantages;
  const bool* mask;
  const void* values;
  const void* old_values;
  const void* returns;
  int64_t strides[kNumTensors][2];  // element strides {row, column}, indexed by PpoTensor
  InputType input_type;
  int64_t batch;
  int64_t steps;
  double clip_coef;
  double value_clip;
};

// 0-dim outputs of the forward: float32, or float64 when input_type is kFloat64.
struct PpoLossOutputs {
  void* policy_loss;
  void* clipfrac;
  void* approx_kl;
  void* ratio_mean;
  void* value_loss;      // 0 without the value loss
  void* value_clipfrac;  // 0 without the value loss
  int64_t* valid_count;
};

struct PpoLossGradients {
  const void* grad_policy_loss;  // 0-dim, the forward's output dtype
  const void* grad_value_loss;   // 0-dim, the forward's output dtype; unused without the value loss
  const int64_t* valid_count;    // the forward's valid_count
  void* grad_logprobs;           // contiguous [B, T], input_type
  void* grad_values;             // contiguous [B, T], input_type; null without the value loss
};

// Bytes of device scratch the forward needs for `problem` on the current device.
cudaError_t ppo_losses_forward_workspace_bytes(const PpoLossProblem& problem, size_t* bytes);

// Enqueues the forward on `stream` (a memset of the block counter, then the one kernel).
cudaError_t ppo_losses_forward_launch(const PpoLossProblem& problem, const PpoLossOutputs& outputs,
                                      void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Enqueues the backward on `stream`.
cudaError_t ppo_losses_backward_launch(const PpoLossProblem& problem, const PpoLossGradients& gradients,
                                       cudaStream_t stream);

}  // namespace rlhf_fast
