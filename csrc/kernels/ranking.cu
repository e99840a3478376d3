// K-wise ranking loss kernels (see ranking.cuh for the layout of the work).
//
// A group has at most 16 completions, so one warp owns a prompt: lane k holds completion k (reward, reward −
// margin, rank) and the pair loop fetches the two members of a pair with shuffles. Nothing of size [K, K]
// touches memory. Group boundaries are clamped to 16 completions and to the rewards' length, so inputs that
// skipped the Python checks cannot make a kernel read or write out of bounds.
//
// Determinism: every sum has a fixed order (warp butterflies, then one block reducing per-prompt partials in
// prompt order with cub::BlockReduce), so results do not depend on scheduling. The multi-block forward uses
// a last-block-done ticket only to decide *which* block reduces, not the order of the sum.
#include "kernels/input_type.cuh"
#include "kernels/ranking.cuh"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rlhf_fast {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kForwardThreads = 1024;
constexpr int kForwardWarps = kForwardThreads / kWarp;
constexpr int kBackwardThreads = 256;
constexpr int kBackwardWarps = kBackwardThreads / kWarp;
constexpr int kHalfGroup = kRankingMaxGroup / 2;
static_assert(kRankingMaxGroup == 16 && kRankingMaxGroup * kRankingMaxGroup <= 8 * kWarp,
              "the pair loop assumes at most 8 steps of 32 pairs and two lanes per completion");

template <typename T>
__device__ __forceinline__ T narrow(float x);
template <>
__device__ __forceinline__ float narrow<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half narrow<__half>(float x) { return __float2half(x); }
template <typename T>
__device__ __forceinline__ T narrow(double x) { return x; }

// −log σ(x) = max(−x, 0) + log1p(e^−|x|): no overflow for either sign, no loss of the small tail.
__device__ __forceinline__ float neg_log_sigmoid(float x) { return fmaxf(-x, 0.f) + log1pf(__expf(-fabsf(x))); }
__device__ __forceinline__ double neg_log_sigmoid(double x) { return fmax(-x, 0.0) + log1p(exp(-fabs(x))); }
// σ(−x) = 1 / (1 + e^x): e^x overflowing to inf gives the right limit 0.
__device__ __forceinline__ float sigmoid_of_negative(float x) { return 1.f / (1.f + __expf(x)); }
__device__ __forceinline__ double sigmoid_of_negative(double x) { return 1.0 / (1.0 + exp(x)); }

__device__ __forceinline__ long long load_index(const void* base, int64_t i, int64_t stride, int itemsize) {
  return itemsize == 4 ? static_cast<long long>(static_cast<const int32_t*>(base)[i * stride])
                       : static_cast<long long>(static_cast<const int64_t*>(base)[i * stride]);
}

// Where prompt p's group lies: [start, start + size), size clamped to [0, 16] and to the rewards.
// `ends` may have been written earlier in the same kernel, so it is read with plain (coherent) loads.
__device__ __forceinline__ void group_bounds(const int64_t* ends, int64_t prompt, int64_t num_completions,
                                             int64_t* start, int* size) {
  const int64_t first = prompt == 0 ? 0 : ends[prompt - 1];
  const int64_t last = min(ends[prompt], num_completions);
  *start = first;
  *size = (first < 0 || first >= last) ? 0 : static_cast<int>(min(last - first, int64_t{kRankingMaxGroup}));
}

template <typename acc_t>
struct Member {
  acc_t reward;
  acc_t shifted;  // reward − per-completion margin
  long long rank;
};

template <typename input_t, typename acc_t>
__device__ __forceinline__ Member<acc_t> load_member(const RankingProblem& problem, int64_t start, int k, int size) {
  if (k >= size) return {acc_t(0), acc_t(0), 0};
  const int64_t index = start + k;
  const acc_t reward = widen(static_cast<const input_t*>(problem.rewards)[index * problem.rewards_stride]);
  const acc_t shifted =
      problem.margins ? reward - static_cast<const acc_t*>(problem.margins)[index * problem.margins_stride] : reward;
  const long long rank =
      problem.ranks ? load_index(problem.ranks, index, problem.ranks_stride, problem.ranks_itemsize) : k;
  return {reward, shifted, rank};
}

template <typename acc_t>
struct PromptPartial {
  acc_t term_sum;
  int pairs;
  int correct;
};

// One warp, one prompt: Σ −log σ over the pairs i above j, their number and how many the rewards order.
// Every lane returns the warp's totals.
template <typename input_t, typename acc_t>
__device__ PromptPartial<acc_t> prompt_forward(const RankingProblem& problem, const int64_t* ends, int64_t prompt,
                                               int lane, acc_t margin) {
  int64_t start;
  int size;
  group_bounds(ends, prompt, problem.num_completions, &start, &size);
  const Member<acc_t> member = load_member<input_t, acc_t>(problem, start, lane, size);
  PromptPartial<acc_t> partial{acc_t(0), 0, 0};
  const int ordered_pairs = size * size;
  // `size` is the same on every lane, so every lane runs the same steps and the shuffles see the whole warp.
  for (int base = 0; base < ordered_pairs; base += kWarp) {
    const int q = base + lane;
    const bool in_range = q < ordered_pairs;
    const int i = in_range ? q / size : 0;
    const int j = in_range ? q - i * size : 0;
    const acc_t reward_i = __shfl_sync(kFullMask, member.reward, i);
    const acc_t reward_j = __shfl_sync(kFullMask, member.reward, j);
    const acc_t shifted_i = __shfl_sync(kFullMask, member.shifted, i);
    const acc_t shifted_j = __shfl_sync(kFullMask, member.shifted, j);
    const long long rank_i = __shfl_sync(kFullMask, member.rank, i);
    const long long rank_j = __shfl_sync(kFullMask, member.rank, j);
    if (in_range && rank_i < rank_j) {  // i ranked above j; ties and i == j form no pair
      partial.term_sum += neg_log_sigmoid(shifted_i - shifted_j - margin);
      partial.pairs += 1;
      partial.correct += reward_i > reward_j;
    }
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    partial.term_sum += __shfl_xor_sync(kFullMask, partial.term_sum, offset);
    partial.pairs += __shfl_xor_sync(kFullMask, partial.pairs, offset);
    partial.correct += __shfl_xor_sync(kFullMask, partial.correct, offset);
  }
  return partial;
}

struct Totals {
  double mean_sum;  // Σ over prompts with a pair of (Σ −log σ) / #pairs
  long long prompts_with_pairs;
  long long pairs;
  long long correct;
};

struct SumTotals {
  __device__ __forceinline__ Totals operator()(const Totals& a, const Totals& b) const {
    return {a.mean_sum + b.mean_sum, a.prompts_with_pairs + b.prompts_with_pairs, a.pairs + b.pairs,
            a.correct + b.correct};
  }
};

using EndsScan = cub::BlockScan<long long, kForwardThreads>;
using TotalsReduce = cub::BlockReduce<Totals, kForwardThreads>;

union ForwardTemp {
  typename EndsScan::TempStorage scan;
  typename TotalsReduce::TempStorage reduce;
};

// prompt_ends = inclusive cumulative sum of group_sizes, by one block, a chunk of kForwardThreads at a time.
__device__ void scan_group_ends(const RankingProblem& problem, int64_t* ends, ForwardTemp& temp) {
  long long carry = 0;
  for (int64_t chunk = 0; chunk < problem.num_prompts; chunk += kForwardThreads) {
    const int64_t prompt = chunk + threadIdx.x;
    const long long size = prompt < problem.num_prompts
                               ? load_index(problem.group_sizes, prompt, problem.group_sizes_stride,
                                            problem.group_sizes_itemsize)
                               : 0;
    long long inclusive, chunk_total;
    EndsScan(temp.scan).InclusiveSum(size, inclusive, chunk_total);
    if (prompt < problem.num_prompts) ends[prompt] = carry + inclusive;
    carry += chunk_total;
    __syncthreads();  // temp.scan is reused by the next chunk
  }
}

template <bool kCrossBlock, typename T>
__device__ __forceinline__ T read_partial(const T* address) {
  if constexpr (kCrossBlock) {
    return __ldcg(address);  // written by other blocks: read from L2, never a stale L1 line
  } else {
    return *address;
  }
}

// The block-wide end of the forward: loss, accuracy and the per-prompt weights from per-prompt partials.
// `prompt_means` may alias `weights` (each thread reads its prompts' means before the barrier inside the
// reduction, and writes their weights after it).
template <bool kCrossBlock, typename acc_t>
__device__ void finish_forward(int64_t num_prompts, const acc_t* prompt_means, const int* pair_counts,
                               const int* correct_counts, acc_t* loss, acc_t* accuracy, acc_t* weights,
                               ForwardTemp& temp, long long* shared_prompts_with_pairs) {
  Totals mine{0.0, 0, 0, 0};
  for (int64_t prompt = threadIdx.x; prompt < num_prompts; prompt += kForwardThreads) {
    const int pairs = read_partial<kCrossBlock>(pair_counts + prompt);
    if (pairs > 0) {
      mine.mean_sum += static_cast<double>(read_partial<kCrossBlock>(prompt_means + prompt));
      mine.prompts_with_pairs += 1;
    }
    mine.pairs += pairs;
    mine.correct += read_partial<kCrossBlock>(correct_counts + prompt);
  }
  const Totals total = TotalsReduce(temp.reduce).Reduce(mine, SumTotals());
  if (threadIdx.x == 0) {
    *loss = static_cast<acc_t>(total.prompts_with_pairs ? total.mean_sum / total.prompts_with_pairs : 0.0);
    *accuracy = static_cast<acc_t>(total.pairs ? static_cast<double>(total.correct) / total.pairs : 0.0);
    *shared_prompts_with_pairs = total.prompts_with_pairs;
  }
  __syncthreads();
  const acc_t prompts_with_pairs = static_cast<acc_t>(*shared_prompts_with_pairs);
  for (int64_t prompt = threadIdx.x; prompt < num_prompts; prompt += kForwardThreads) {
    const int pairs = read_partial<kCrossBlock>(pair_counts + prompt);
    weights[prompt] = pairs > 0 ? acc_t(1) / (static_cast<acc_t>(pairs) * prompts_with_pairs) : acc_t(0);
  }
}

// Small batches: everything in one block, one launch.
template <typename input_t, typename acc_t>
__global__ void __launch_bounds__(kForwardThreads)
    ranking_forward_single_block(RankingProblem problem, acc_t margin, RankingForwardOutputs outputs) {
  __shared__ ForwardTemp temp;
  __shared__ acc_t prompt_means[kRankingSingleBlockMaxPrompts];
  __shared__ int pair_counts[kRankingSingleBlockMaxPrompts];
  __shared__ int correct_counts[kRankingSingleBlockMaxPrompts];
  __shared__ long long prompts_with_pairs;

  scan_group_ends(problem, outputs.prompt_ends, temp);  // ends a __syncthreads: the ends are visible
  const int lane = threadIdx.x % kWarp;
  for (int64_t prompt = threadIdx.x / kWarp; prompt < problem.num_prompts; prompt += kForwardWarps) {
    const auto partial = prompt_forward<input_t, acc_t>(problem, outputs.prompt_ends, prompt, lane, margin);
    if (lane == 0) {
      prompt_means[prompt] = partial.pairs ? partial.term_sum / static_cast<acc_t>(partial.pairs) : acc_t(0);
      pair_counts[prompt] = partial.pairs;
      correct_counts[prompt] = partial.correct;
    }
  }
  __syncthreads();
  finish_forward<false>(problem.num_prompts, prompt_means, pair_counts, correct_counts,
                        static_cast<acc_t*>(outputs.loss), static_cast<acc_t*>(outputs.accuracy),
                        static_cast<acc_t*>(outputs.prompt_weights), temp, &prompts_with_pairs);
}

// Large batches, step 1: the group ends, and the ticket of step 2 reset (so the workspace needs no memset).
__global__ void __launch_bounds__(kForwardThreads)
    ranking_group_ends(RankingProblem problem, int64_t* ends, unsigned int* ticket) {
  __shared__ ForwardTemp temp;
  scan_group_ends(problem, ends, temp);
  if (threadIdx.x == 0) *ticket = 0;
}

// Large batches, step 2: one warp per prompt; partials to global memory; the last block reduces them.
template <typename input_t, typename acc_t>
__global__ void __launch_bounds__(kForwardThreads)
    ranking_forward_multi_block(RankingProblem problem, acc_t margin, RankingForwardOutputs outputs,
                                int* pair_counts, int* correct_counts, unsigned int* ticket) {
  __shared__ ForwardTemp temp;
  __shared__ long long prompts_with_pairs;
  __shared__ bool is_last_block;
  acc_t* prompt_means = static_cast<acc_t*>(outputs.prompt_weights);  // overwritten by the weights at the end

  const int lane = threadIdx.x % kWarp;
  const int64_t prompt = static_cast<int64_t>(blockIdx.x) * kForwardWarps + threadIdx.x / kWarp;
  if (prompt < problem.num_prompts) {  // uniform per warp
    const auto partial = prompt_forward<input_t, acc_t>(problem, outputs.prompt_ends, prompt, lane, margin);
    if (lane == 0) {
      prompt_means[prompt] = partial.pairs ? partial.term_sum / static_cast<acc_t>(partial.pairs) : acc_t(0);
      pair_counts[prompt] = partial.pairs;
      correct_counts[prompt] = partial.correct;
    }
  }
  __threadfence();  // this block's partials are visible device-wide before it takes a ticket
  __syncthreads();
  if (threadIdx.x == 0) is_last_block = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last_block) return;
  __threadfence();
  finish_forward<true>(problem.num_prompts, prompt_means, pair_counts, correct_counts,
                       static_cast<acc_t*>(outputs.loss), static_cast<acc_t*>(outputs.accuracy),
                       static_cast<acc_t*>(outputs.prompt_weights), temp, &prompts_with_pairs);
}

// One warp per prompt; lane = completion i (lane mod 16) and half h (lane / 16), which takes partners
// j in [8h, 8h + 8). d loss / d r_i = grad · w_p · Σ_j −sign_ij · σ(−logit_ij), sign_ij = +1 when i is
// ranked above j (r_i raises the pair's logit) and −1 when below.
template <typename input_t, typename acc_t>
__global__ void __launch_bounds__(kBackwardThreads)
    ranking_backward_kernel(RankingProblem problem, acc_t margin, const acc_t* grad_loss, const acc_t* weights,
                            const int64_t* ends, input_t* grad_rewards) {
  const int lane = threadIdx.x % kWarp;
  const int64_t prompt = static_cast<int64_t>(blockIdx.x) * kBackwardWarps + threadIdx.x / kWarp;
  if (prompt >= problem.num_prompts) return;  // uniform per warp; no block-wide barrier follows
  int64_t start;
  int size;
  group_bounds(ends, prompt, problem.num_completions, &start, &size);
  const int i = lane % kRankingMaxGroup;
  const int half = lane / kRankingMaxGroup;
  const Member<acc_t> member = load_member<input_t, acc_t>(problem, start, i, size);  // lane j < 16 holds j
  acc_t slope_sum = 0;
#pragma unroll
  for (int step = 0; step < kHalfGroup; ++step) {
    const int j = half * kHalfGroup + step;
    const acc_t shifted_j = __shfl_sync(kFullMask, member.shifted, j);
    const long long rank_j = __shfl_sync(kFullMask, member.rank, j);
    if (i < size && j < size && member.rank != rank_j) {
      const acc_t sign = member.rank < rank_j ? acc_t(1) : acc_t(-1);
      slope_sum -= sign * sigmoid_of_negative(sign * (member.shifted - shifted_j) - margin);
    }
  }
  slope_sum += __shfl_xor_sync(kFullMask, slope_sum, kRankingMaxGroup);
  if (half == 0 && i < size) {
    grad_rewards[start + i] = narrow<input_t>(slope_sum * (*grad_loss * weights[prompt]));
  }
}

template <typename input_t, typename acc_t>
cudaError_t forward_typed(ElementTypes<input_t, acc_t>, const RankingProblem& problem,
                          const RankingForwardOutputs& outputs, void* workspace, cudaStream_t stream) {
  const acc_t margin = static_cast<acc_t>(problem.margin);
  if (problem.num_prompts <= kRankingSingleBlockMaxPrompts) {
    ranking_forward_single_block<input_t, acc_t><<<1, kForwardThreads, 0, stream>>>(problem, margin, outputs);
    return cudaGetLastError();
  }
  if (workspace == nullptr) return cudaErrorInvalidValue;
  int* pair_counts = static_cast<int*>(workspace);
  int* correct_counts = pair_counts + problem.num_prompts;
  auto* ticket = reinterpret_cast<unsigned int*>(correct_counts + problem.num_prompts);
  ranking_group_ends<<<1, kForwardThreads, 0, stream>>>(problem, outputs.prompt_ends, ticket);
  const int64_t blocks = (problem.num_prompts + kForwardWarps - 1) / kForwardWarps;
  ranking_forward_multi_block<input_t, acc_t><<<static_cast<unsigned int>(blocks), kForwardThreads, 0, stream>>>(
      problem, margin, outputs, pair_counts, correct_counts, ticket);
  return cudaGetLastError();
}

template <typename input_t, typename acc_t>
cudaError_t backward_typed(ElementTypes<input_t, acc_t>, const RankingProblem& problem, const void* grad_loss,
                           const void* weights, const int64_t* ends, void* grad_rewards, cudaStream_t stream) {
  if (problem.num_prompts == 0) return cudaSuccess;
  const int64_t blocks = (problem.num_prompts + kBackwardWarps - 1) / kBackwardWarps;
  ranking_backward_kernel<input_t, acc_t><<<static_cast<unsigned int>(blocks), kBackwardThreads, 0, stream>>>(
      problem, static_cast<acc_t>(problem.margin), static_cast<const acc_t*>(grad_loss),
      static_cast<const acc_t*>(weights), ends, static_cast<input_t*>(grad_rewards));
  return cudaGetLastError();
}

bool valid_problem(const RankingProblem& problem) {
  const bool ranks_ok = problem.ranks == nullptr || problem.ranks_itemsize == 4 || problem.ranks_itemsize == 8;
  return problem.num_prompts >= 0 && problem.num_completions >= 0 && ranks_ok &&
         problem.num_prompts <= int64_t{0x7fffffff} * kBackwardWarps;
}

}  // namespace

size_t ranking_forward_workspace_bytes(int64_t num_prompts) {
  if (num_prompts <= kRankingSingleBlockMaxPrompts) return 0;
  return static_cast<size_t>(2 * num_prompts + 1) * sizeof(int);
}

cudaError_t ranking_forward_launch(const RankingProblem& problem, const RankingForwardOutputs& outputs,
                                   void* workspace, cudaStream_t stream) {
  if (!valid_problem(problem) || (problem.group_sizes_itemsize != 4 && problem.group_sizes_itemsize != 8)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_input_type(problem.input_type, [&](auto types) {
    return forward_typed(types, problem, outputs, workspace, stream);
  });
}

cudaError_t ranking_backward_launch(const RankingProblem& problem, const void* grad_loss,
                                    const void* prompt_weights, const int64_t* prompt_ends, void* grad_rewards,
                                    cudaStream_t stream) {
  if (!valid_problem(problem)) return cudaErrorInvalidValue;
  return dispatch_input_type(problem.input_type, [&](auto types) {
    return backward_typed(types, problem, grad_loss, prompt_weights, prompt_ends, grad_rewards, stream);
  });
}

}  // namespace rlhf_fast
