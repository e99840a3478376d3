// CUDA implementation of rlhf_fast_C::ranking_loss_forward / ranking_loss_backward (schemas declared in
// csrc/cpu/ranking.cpp): checks the tensors, allocates outputs and scratch, and hands raw pointers to
// csrc/kernels/ranking.cu. Strided rewards, ranks and margins are read in place (no copies).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "checks/ranking.h"
#include "dtype.h"
#include "kernels/ranking.cuh"

namespace {

// The kernels read int32 or int64 indices; other integer types are widened once.
at::Tensor as_index(const at::Tensor& values) {
  const auto dtype = values.scalar_type();
  return dtype == at::kInt || dtype == at::kLong ? values : values.to(at::kLong);
}

void check_device(const at::Tensor& rewards, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == rewards.device(), "ranking_loss: ", name, " is on ", other.device(),
              " but rewards is on ", rewards.device());
}

// The fields shared by forward and backward: rewards, ranks, margins.
rlhf_fast::RankingProblem make_problem(const at::Tensor& rewards, const at::Tensor& ranks, const at::Tensor& margins,
                                       double margin) {
  rlhf_fast::RankingProblem problem{};
  problem.rewards = rewards.data_ptr();
  problem.rewards_stride = rewards.stride(0);
  problem.input_type = rlhf_fast::input_type_of(rewards.scalar_type(), "ranking_loss", "rewards");
  if (ranks.defined()) {
    problem.ranks = ranks.data_ptr();
    problem.ranks_stride = ranks.stride(0);
    problem.ranks_itemsize = static_cast<int>(ranks.element_size());
  }
  if (margins.defined()) {
    problem.margins = margins.data_ptr();
    problem.margins_stride = margins.stride(0);
  }
  problem.margin = margin;
  problem.num_completions = rewards.numel();
  return problem;
}

std::tuple<at::Tensor, at::Tensor> prepare_extras(const at::Tensor& rewards, const std::optional<at::Tensor>& ranks,
                                                  const std::optional<at::Tensor>& margins) {
  at::Tensor ranks_in, margins_in;
  if (ranks) {
    check_device(rewards, *ranks, "ranks");
    ranks_in = as_index(*ranks);
  }
  if (margins) {
    check_device(rewards, *margins, "margins");
    const auto dtype = rlhf_fast::accumulate_dtype(rewards.scalar_type());
    margins_in = margins->scalar_type() == dtype ? *margins : margins->to(dtype);
  }
  return {ranks_in, margins_in};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ranking_loss_forward_cuda(
    const at::Tensor& rewards, const at::Tensor& group_sizes, const std::optional<at::Tensor>& ranks,
    const std::optional<at::Tensor>& margins, double margin) {
  rlhf_fast::check_ranking_forward_args(rewards, group_sizes, ranks, margins);
  TORCH_CHECK(rewards.is_cuda(), "ranking_loss: rewards must be a CUDA tensor");
  check_device(rewards, group_sizes, "group_sizes");
  const c10::cuda::CUDAGuard device_guard(rewards.device());
  const auto [ranks_in, margins_in] = prepare_extras(rewards, ranks, margins);
  const at::Tensor sizes_in = as_index(group_sizes);
  const int64_t num_prompts = group_sizes.size(0);

  const auto options = rewards.options().dtype(rlhf_fast::accumulate_dtype(rewards.scalar_type()));
  auto loss = at::empty({}, options);
  auto accuracy = at::empty({}, options);
  auto weights = at::empty({num_prompts}, options);
  auto ends = at::empty({num_prompts}, rewards.options().dtype(at::kLong));

  auto problem = make_problem(rewards, ranks_in, margins_in, margin);
  problem.group_sizes = sizes_in.data_ptr();
  problem.group_sizes_stride = sizes_in.stride(0);
  problem.group_sizes_itemsize = static_cast<int>(sizes_in.element_size());
  problem.num_prompts = num_prompts;
  const rlhf_fast::RankingForwardOutputs outputs{loss.data_ptr(), accuracy.data_ptr(), weights.data_ptr(),
                                                 ends.data_ptr<int64_t>()};

  const size_t workspace_bytes = rlhf_fast::ranking_forward_workspace_bytes(num_prompts);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, rewards.options().dtype(at::kByte));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(rewards.device().index()).stream();
  C10_CUDA_CHECK(rlhf_fast::ranking_forward_launch(problem, outputs,
                                                   workspace_bytes > 0 ? workspace.data_ptr() : nullptr, stream));
  return {loss, accuracy, weights, ends};
}

at::Tensor ranking_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& rewards,
                                      const std::optional<at::Tensor>& ranks,
                                      const std::optional<at::Tensor>& margins, double margin,
                                      const at::Tensor& prompt_weights, const at::Tensor& prompt_ends) {
  rlhf_fast::check_ranking_backward_args(grad_loss, rewards, ranks, margins, prompt_weights, prompt_ends);
  TORCH_CHECK(rewards.is_cuda(), "ranking_loss: rewards must be a CUDA tensor");
  check_device(rewards, grad_loss, "grad_loss");
  check_device(rewards, prompt_weights, "prompt_weights");
  check_device(rewards, prompt_ends, "prompt_ends");
  const c10::cuda::CUDAGuard device_guard(rewards.device());
  const auto [ranks_in, margins_in] = prepare_extras(rewards, ranks, margins);
  const auto dtype = rlhf_fast::accumulate_dtype(rewards.scalar_type());
  const at::Tensor grad_in = grad_loss.to(dtype).contiguous();
  const at::Tensor weights_in = prompt_weights.to(dtype).contiguous();
  const at::Tensor ends_in = prompt_ends.to(at::kLong).contiguous();
  // Zeros, so entries outside every group (only possible when the checks were skipped) stay defined.
  auto grad_rewards = at::zeros(rewards.sizes(), rewards.options());

  auto problem = make_problem(rewards, ranks_in, margins_in, margin);
  problem.num_prompts = prompt_ends.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(rewards.device().index()).stream();
  C10_CUDA_CHECK(rlhf_fast::ranking_backward_launch(problem, grad_in.data_ptr(), weights_in.data_ptr(),
                                                    ends_in.data_ptr<int64_t>(), grad_rewards.data_ptr(), stream));
  return grad_rewards;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast_C, CUDA, m) {
  m.impl("ranking_loss_forward", &ranking_loss_forward_cuda);
  m.impl("ranking_loss_backward", &ranking_loss_backward_cuda);
}
