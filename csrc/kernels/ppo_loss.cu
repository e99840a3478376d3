// PPO clipped losses on the GPU (see ppo_loss.cuh for the contract, ppo_loss_token.h for the math).
//
// Forward: a grid-stride pass in which each thread sums its tokens in acc_t (float, or double for double
// inputs); cub::BlockReduce turns the block's threads into one Partial in double; each block stores its
// Partial and bumps a counter, and the block that bumps it last adds all Partials in index order and writes
// the means. One launch, no float atomics, the same bits on every run for a given grid (the grid depends only
// on the token count and the device's multiprocessor count).
//
// Backward: elementwise, recomputing the ratio; 1/count comes from the forward's valid_count on the device,
// so nothing is read back to the host.
#include "kernels/input_type.cuh"
#include "kernels/ppo_loss.cuh"
#include "kernels/ppo_loss_token.h"

#include <cub/block/block_reduce.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

namespace rlhf_fast {
namespace {

using ppo_loss::policy_token;
using ppo_loss::value_token;

constexpr int kThreads = 256;
constexpr int kTokensPerThread = 4;  // aimed for; blocks are capped at kBlocksPerMultiprocessor per SM
constexpr int kBlocksPerMultiprocessor = 4;

__device__ __forceinline__ void store(float* out, float x) { *out = x; }
__device__ __forceinline__ void store(double* out, double x) { *out = x; }
__device__ __forceinline__ void store(__nv_bfloat16* out, float x) { *out = __float2bfloat16(x); }
__device__ __forceinline__ void store(__half* out, float x) { *out = __float2half(x); }

struct Partial {
  double policy_loss, approx_kl, ratio, value_loss;
  long long valid, clipped, value_clipped;
};

struct AddPartials {
  __device__ __forceinline__ Partial operator()(const Partial& a, const Partial& b) const {
    return {a.policy_loss + b.policy_loss, a.approx_kl + b.approx_kl, a.ratio + b.ratio,
            a.value_loss + b.value_loss,   a.valid + b.valid,         a.clipped + b.clipped,
            a.value_clipped + b.value_clipped};
  }
};

// Reads a Partial another block wrote, from L2 (never from this SM's L1).
__device__ __forceinline__ Partial load_partial(const Partial* partial) {
  return {__ldcg(&partial->policy_loss), __ldcg(&partial->approx_kl), __ldcg(&partial->ratio),
          __ldcg(&partial->value_loss),  __ldcg(&partial->valid),     __ldcg(&partial->clipped),
          __ldcg(&partial->value_clipped)};
}

// Typed pointers and strides of one problem.
template <typename scalar_t>
struct Tokens {
  const scalar_t* logprobs;
  const scalar_t* old_logprobs;
  const scalar_t* advantages;
  const bool* mask;
  const scalar_t* values;
  const scalar_t* old_values;
  const scalar_t* returns;
  int64_t strides[kNumTensors][2];
  int64_t numel;
  int64_t steps;

  __device__ __forceinline__ int64_t offset(int tensor, int64_t row, int64_t col) const {
    return row * strides[tensor][0] + col * strides[tensor][1];
  }
};

template <typename scalar_t>
Tokens<scalar_t> typed(const PpoLossProblem& problem) {
  Tokens<scalar_t> tokens{};
  tokens.logprobs = static_cast<const scalar_t*>(problem.logprobs);
  tokens.old_logprobs = static_cast<const scalar_t*>(problem.old_logprobs);
  tokens.advantages = static_cast<const scalar_t*>(problem.advantages);
  tokens.mask = problem.mask;
  tokens.values = static_cast<const scalar_t*>(problem.values);
  tokens.old_values = static_cast<const scalar_t*>(problem.old_values);
  tokens.returns = static_cast<const scalar_t*>(problem.returns);
  for (int tensor = 0; tensor < kNumTensors; ++tensor) {
    tokens.strides[tensor][0] = problem.strides[tensor][0];
    tokens.strides[tensor][1] = problem.strides[tensor][1];
  }
  tokens.numel = problem.batch * problem.steps;
  tokens.steps = problem.steps;
  return tokens;
}

template <typename out_t>
__device__ __forceinline__ void store_mean(void* out, double sum, double inverse_count) {
  *static_cast<out_t*>(out) = static_cast<out_t>(sum * inverse_count);
}

template <typename scalar_t, typename acc_t, bool kHasValues>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const Tokens<scalar_t> tokens, acc_t ratio_low, acc_t ratio_high, acc_t value_clip,
                   Partial* __restrict__ partials, unsigned int* __restrict__ blocks_done, PpoLossOutputs outputs) {
  acc_t policy_loss = 0, approx_kl = 0, ratio = 0, value_loss = 0;
  long long valid = 0, clipped = 0, value_clipped = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < tokens.numel; i += stride) {
    const int64_t row = i / tokens.steps, col = i - row * tokens.steps;
    if (!tokens.mask[tokens.offset(kMask, row, col)]) continue;
    const auto policy = policy_token<acc_t>(widen(tokens.logprobs[tokens.offset(kLogprobs, row, col)]),
                                            widen(tokens.old_logprobs[tokens.offset(kOldLogprobs, row, col)]),
                                            widen(tokens.advantages[tokens.offset(kAdvantages, row, col)]),
                                            ratio_low, ratio_high);
    policy_loss += policy.loss;
    approx_kl += policy.approx_kl;
    ratio += policy.ratio;
    clipped += policy.clipped;
    valid += 1;
    if constexpr (kHasValues) {
      const auto value = value_token<acc_t>(widen(tokens.values[tokens.offset(kValues, row, col)]),
                                            widen(tokens.old_values[tokens.offset(kOldValues, row, col)]),
                                            widen(tokens.returns[tokens.offset(kReturns, row, col)]), value_clip);
      value_loss += value.loss;
      value_clipped += value.clipped;
    }
  }

  using BlockReduce = cub::BlockReduce<Partial, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  __shared__ bool is_last_block;
  const Partial mine{policy_loss, approx_kl, ratio, value_loss, valid, clipped, value_clipped};
  const Partial block_total = BlockReduce(reduce_storage).Reduce(mine, AddPartials());
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = block_total;
    __threadfence();  // publish the Partial before the counter says it is there
    is_last_block = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last_block) return;
  __threadfence();

  // Each thread adds a fixed, strided subset of the Partials in index order; the block reduction's order is
  // fixed too.
  Partial gathered{0, 0, 0, 0, 0, 0, 0};
  for (unsigned int block = threadIdx.x; block < gridDim.x; block += kThreads) {
    gathered = AddPartials()(gathered, load_partial(&partials[block]));
  }
  __syncthreads();  // reduce_storage is reused
  const Partial total = BlockReduce(reduce_storage).Reduce(gathered, AddPartials());
  if (threadIdx.x == 0) {
    using out_t = std::conditional_t<std::is_same_v<acc_t, double>, double, float>;
    // An all-masked batch divides zeros by 1: every output is 0, never NaN.
    const double inverse_count = 1.0 / static_cast<double>(total.valid > 0 ? total.valid : 1);
    store_mean<out_t>(outputs.policy_loss, total.policy_loss, inverse_count);
    store_mean<out_t>(outputs.clipfrac, static_cast<double>(total.clipped), inverse_count);
    store_mean<out_t>(outputs.approx_kl, total.approx_kl, inverse_count);
    store_mean<out_t>(outputs.ratio_mean, total.ratio, inverse_count);
    store_mean<out_t>(outputs.value_loss, total.value_loss, inverse_count);
    store_mean<out_t>(outputs.value_clipfrac, static_cast<double>(total.value_clipped), inverse_count);
    *outputs.valid_count = total.valid;
  }
}

template <typename scalar_t, typename acc_t, bool kHasValues>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const Tokens<scalar_t> tokens, acc_t ratio_low, acc_t ratio_high, acc_t value_clip,
                    const acc_t* __restrict__ grad_policy_loss, const acc_t* __restrict__ grad_value_loss,
                    const int64_t* __restrict__ valid_count, scalar_t* __restrict__ grad_logprobs,
                    scalar_t* __restrict__ grad_values) {
  // d mean / d token = 1 / count; an all-masked batch has no token to receive it.
  const int64_t count = *valid_count;
  const double inverse_count = 1.0 / static_cast<double>(count > 0 ? count : 1);
  const auto policy_scale = static_cast<acc_t>(static_cast<double>(*grad_policy_loss) * inverse_count);
  acc_t value_scale = 0;
  if constexpr (kHasValues) value_scale = static_cast<acc_t>(static_cast<double>(*grad_value_loss) * inverse_count);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < tokens.numel; i += stride) {
    const int64_t row = i / tokens.steps, col = i - row * tokens.steps;
    const bool is_valid = tokens.mask[tokens.offset(kMask, row, col)];
    acc_t grad_logprob = 0;
    if (is_valid) {
      grad_logprob = policy_scale * policy_token<acc_t>(widen(tokens.logprobs[tokens.offset(kLogprobs, row, col)]),
                                                        widen(tokens.old_logprobs[tokens.offset(kOldLogprobs, row, col)]),
                                                        widen(tokens.advantages[tokens.offset(kAdvantages, row, col)]),
                                                        ratio_low, ratio_high)
                                        .grad_logprob;
    }
    store(grad_logprobs + i, grad_logprob);
    if constexpr (kHasValues) {
      acc_t grad_value = 0;
      if (is_valid) {
        grad_value = value_scale * value_token<acc_t>(widen(tokens.values[tokens.offset(kValues, row, col)]),
                                                      widen(tokens.old_values[tokens.offset(kOldValues, row, col)]),
                                                      widen(tokens.returns[tokens.offset(kReturns, row, col)]),
                                                      value_clip)
                                       .grad_value;
      }
      store(grad_values + i, grad_value);
    }
  }
}

cudaError_t grid_size(int64_t numel, int blocks_per_multiprocessor, int* blocks) {
  int device = 0, multiprocessors = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  status = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
  const int64_t wanted = (numel + kThreads * kTokensPerThread - 1) / (kThreads * kTokensPerThread);
  *blocks = static_cast<int>(std::clamp<int64_t>(wanted, 1, static_cast<int64_t>(multiprocessors) * blocks_per_multiprocessor));
  return cudaSuccess;
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_forward(ElementTypes<scalar_t, acc_t>, const PpoLossProblem& problem, const PpoLossOutputs& outputs,
                           Partial* partials, unsigned int* blocks_done, int blocks, cudaStream_t stream) {
  const auto kernel = problem.values != nullptr ? forward_kernel<scalar_t, acc_t, true>
                                                : forward_kernel<scalar_t, acc_t, false>;
  kernel<<<blocks, kThreads, 0, stream>>>(typed<scalar_t>(problem), static_cast<acc_t>(1.0 - problem.clip_coef),
                                          static_cast<acc_t>(1.0 + problem.clip_coef),
                                          static_cast<acc_t>(problem.value_clip), partials, blocks_done, outputs);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_backward(ElementTypes<scalar_t, acc_t>, const PpoLossProblem& problem,
                            const PpoLossGradients& gradients, int blocks, cudaStream_t stream) {
  const auto kernel = problem.values != nullptr ? backward_kernel<scalar_t, acc_t, true>
                                                : backward_kernel<scalar_t, acc_t, false>;
  kernel<<<blocks, kThreads, 0, stream>>>(
      typed<scalar_t>(problem), static_cast<acc_t>(1.0 - problem.clip_coef),
      static_cast<acc_t>(1.0 + problem.clip_coef), static_cast<acc_t>(problem.value_clip),
      static_cast<const acc_t*>(gradients.grad_policy_loss), static_cast<const acc_t*>(gradients.grad_value_loss),
      gradients.valid_count, static_cast<scalar_t*>(gradients.grad_logprobs),
      static_cast<scalar_t*>(gradients.grad_values));
  return cudaGetLastError();
}

}  // namespace

cudaError_t ppo_losses_forward_workspace_bytes(const PpoLossProblem& problem, size_t* bytes) {
  int blocks = 0;
  const cudaError_t status = grid_size(problem.batch * problem.steps, kBlocksPerMultiprocessor, &blocks);
  if (status != cudaSuccess) return status;
  // The Partials, then the block counter (Partial's alignment keeps the counter aligned).
  *bytes = static_cast<size_t>(blocks) * sizeof(Partial) + sizeof(Partial);
  return cudaSuccess;
}

cudaError_t ppo_losses_forward_launch(const PpoLossProblem& problem, const PpoLossOutputs& outputs,
                                      void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  int blocks = 0;
  cudaError_t status = grid_size(problem.batch * problem.steps, kBlocksPerMultiprocessor, &blocks);
  if (status != cudaSuccess) return status;
  if (workspace_bytes < static_cast<size_t>(blocks + 1) * sizeof(Partial)) return cudaErrorInvalidValue;
  auto* partials = static_cast<Partial*>(workspace);
  auto* blocks_done = reinterpret_cast<unsigned int*>(partials + blocks);
  status = cudaMemsetAsync(blocks_done, 0, sizeof(unsigned int), stream);
  if (status != cudaSuccess) return status;
  return dispatch_input_type(problem.input_type, [&](auto types) {
    return launch_forward(types, problem, outputs, partials, blocks_done, blocks, stream);
  });
}

cudaError_t ppo_losses_backward_launch(const PpoLossProblem& problem, const PpoLossGradients& gradients,
                                       cudaStream_t stream) {
  const int64_t numel = problem.batch * problem.steps;
  if (numel == 0) return cudaSuccess;
  int blocks = 0;
  const cudaError_t status = grid_size(numel, 4 * kBlocksPerMultiprocessor, &blocks);
  if (status != cudaSuccess) return status;
  return dispatch_input_type(problem.input_type, [&](auto types) {
    return launch_backward(types, problem, gradients, blocks, stream);
  });
}

}  // namespace rlhf_fast
