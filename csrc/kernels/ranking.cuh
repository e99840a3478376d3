// K-wise ranking loss (InstructGPT reward model) on the GPU: raw pointers and a stream, no torch headers.
// The definition lives in rlhf_fast/ops/ranking.py. In short, for prompt p with group of K ≤ 16 completions,
//     loss_p = 1/#pairs_p · Σ_{i ranked above j} −log σ(s_i − s_j − margin),   s = rewards − margins,
//     loss = mean of loss_p over prompts that have a pair,  accuracy = #(r_i > r_j) / #pairs over the batch.
//
// Forward: one warp per prompt visits the K² ordered pairs (32 lanes, ≤ 8 steps) in registers; per-prompt
// partials are reduced in prompt order by one block (deterministic). Up to kRankingSingleBlockMaxPrompts
// prompts this is a single launch of a single block that also scans group_sizes into the group ends; beyond
// that, one block scans, then a grid of warps computes the partials and the last block to finish reduces.
// Backward: one warp per prompt, two lanes per completion (each takes half of the partners); one launch.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/constants.h"
#include "kernels/input_type.h"

namespace rlhf_fast {

constexpr int64_t kRankingSingleBlockMaxPrompts = 512;

// "acc" below is float64 when input_type is kFloat64, else float32.
struct RankingProblem {
  const void* rewards;  // [num_completions] of input_type, element stride rewards_stride
  int64_t rewards_stride;
  InputType input_type;
  const void* ranks;  // [num_completions] int32 or int64 (ranks_itemsize 4 or 8), or nullptr: best first
  int64_t ranks_stride;
  int ranks_itemsize;
  const void* margins;  // [num_completions] acc per-completion margins, or nullptr
  int64_t margins_stride;
  double margin;  // constant pair margin
  const void* group_sizes;  // forward only: [num_prompts] int32 or int64 (group_sizes_itemsize 4 or 8)
  int64_t group_sizes_stride;
  int group_sizes_itemsize;
  int64_t num_prompts;
  int64_t num_completions;
};

struct RankingForwardOutputs {
  void* loss;            // acc, 0-dim
  void* accuracy;        // acc, 0-dim
  void* prompt_weights;  // [num_prompts] acc: 1 / (#pairs_p · #prompts with a pair), 0 without pairs
  int64_t* prompt_ends;  // [num_prompts] inclusive cumulative sum of group_sizes
};

// Bytes of device scratch (no initialization needed) that ranking_forward_launch needs for num_prompts.
size_t ranking_forward_workspace_bytes(int64_t num_prompts);

cudaError_t ranking_forward_launch(const RankingProblem& problem, const RankingForwardOutputs& outputs,
                                   void* workspace, cudaStream_t stream);

// grad_rewards: contiguous [num_completions] of input_type; entries are written for every completion that
// lies in a group. grad_loss (0-dim) and prompt_weights are acc; prompt_ends as the forward wrote them.
cudaError_t ranking_backward_launch(const RankingProblem& problem, const void* grad_loss,
                                    const void* prompt_weights, const int64_t* prompt_ends, void* grad_rewards,
                                    cudaStream_t stream);

}  // namespace rlhf_fast
