// CUDA implementation of rlhf_fast_C::ppo_losses_forward / ppo_losses_backward (schemas declared in
// csrc/cpu/ppo_loss.cpp): checks the tensors, allocates the outputs and scratch, and hands raw pointers and
// strides to csrc/kernels/ppo_loss.cu. Strided inputs (e.g. logprobs[:, prompt_len:]) are read in place.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks/ppo_loss.h"
#include "dtype.h"
#include "kernels/ppo_loss.cuh"

namespace {

// The problem description plus the tensors it points into that this file created (a bool copy of an
// integer mask), kept alive until the launch is enqueued.
struct Problem {
  rlhf_fast::PpoLossProblem description{};
  at::Tensor mask;
};

Problem describe(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                 const at::Tensor& mask, const std::optional<at::Tensor>& values,
                 const std::optional<at::Tensor>& old_values, const std::optional<at::Tensor>& returns,
                 double clip_coef, double value_clip) {
  const bool has_values =
      rlhf_fast::check_ppo_losses_args(logprobs, old_logprobs, advantages, mask, values, old_values, returns);
  TORCH_CHECK(logprobs.is_cuda(), "ppo_losses: logprobs must be a CUDA tensor");
  Problem problem;
  auto& d = problem.description;
  auto attach = [&](const at::Tensor& tensor, rlhf_fast::PpoTensor index, const char* name) {
    TORCH_CHECK(tensor.device() == logprobs.device(), "ppo_losses: ", name, " must be on the device of logprobs");
    d.strides[index][0] = tensor.stride(0);
    d.strides[index][1] = tensor.stride(1);
    return tensor.data_ptr();
  };
  d.logprobs = attach(logprobs, rlhf_fast::kLogprobs, "logprobs");
  d.old_logprobs = attach(old_logprobs, rlhf_fast::kOldLogprobs, "old_logprobs");
  d.advantages = attach(advantages, rlhf_fast::kAdvantages, "advantages");
  problem.mask = mask.scalar_type() == at::kBool ? mask : mask.ne(0);
  d.mask = static_cast<const bool*>(attach(problem.mask, rlhf_fast::kMask, "mask"));
  if (has_values) {
    d.values = attach(*values, rlhf_fast::kValues, "values");
    d.old_values = attach(*old_values, rlhf_fast::kOldValues, "old_values");
    d.returns = attach(*returns, rlhf_fast::kReturns, "returns");
  }
  d.input_type = rlhf_fast::input_type_of(logprobs.scalar_type(), "ppo_losses", "logprobs");
  d.batch = logprobs.size(0);
  d.steps = logprobs.size(1);
  d.clip_coef = clip_coef;
  d.value_clip = value_clip;
  return problem;
}

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardOutputs ppo_losses_forward_cuda(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                       const at::Tensor& advantages, const at::Tensor& mask,
                                       const std::optional<at::Tensor>& values,
                                       const std::optional<at::Tensor>& old_values,
                                       const std::optional<at::Tensor>& returns, double clip_coef,
                                       double value_clip) {
  const c10::cuda::CUDAGuard device_guard(logprobs.device());
  const Problem problem =
      describe(logprobs, old_logprobs, advantages, mask, values, old_values, returns, clip_coef, value_clip);
  const auto options = logprobs.options().dtype(rlhf_fast::accumulate_dtype(logprobs.scalar_type()));
  // Separate allocations: a custom op's outputs may not alias one another.
  at::Tensor policy_loss = at::empty({}, options), clipfrac = at::empty({}, options);
  at::Tensor approx_kl = at::empty({}, options), ratio_mean = at::empty({}, options);
  at::Tensor value_loss = at::empty({}, options), value_clipfrac = at::empty({}, options);
  at::Tensor valid_count = at::empty({}, logprobs.options().dtype(at::kLong));
  const rlhf_fast::PpoLossOutputs outputs{policy_loss.data_ptr(), clipfrac.data_ptr(),
                                          approx_kl.data_ptr(),   ratio_mean.data_ptr(),
                                          value_loss.data_ptr(),  value_clipfrac.data_ptr(),
                                          valid_count.data_ptr<int64_t>()};

  size_t workspace_bytes = 0;
  C10_CUDA_CHECK(rlhf_fast::ppo_losses_forward_workspace_bytes(problem.description, &workspace_bytes));
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, logprobs.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logprobs.device().index()).stream();
  C10_CUDA_CHECK(rlhf_fast::ppo_losses_forward_launch(problem.description, outputs, workspace.data_ptr(),
                                                      workspace_bytes, stream));
  return {policy_loss, clipfrac, approx_kl, ratio_mean, value_loss, value_clipfrac, valid_count};
}

std::tuple<at::Tensor, at::Tensor> ppo_losses_backward_cuda(
    const at::Tensor& grad_policy_loss, const at::Tensor& grad_value_loss, const at::Tensor& logprobs,
    const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& old_values,
    const std::optional<at::Tensor>& returns, const at::Tensor& valid_count, double clip_coef, double value_clip) {
  const c10::cuda::CUDAGuard device_guard(logprobs.device());
  const Problem problem =
      describe(logprobs, old_logprobs, advantages, mask, values, old_values, returns, clip_coef, value_clip);
  const bool has_values = problem.description.values != nullptr;
  // The kernel reads the upstream gradients and the count on the device: no host synchronization.
  auto on_device = [&](const at::Tensor& scalar, at::ScalarType dtype, const char* name) {
    TORCH_CHECK(scalar.numel() == 1, "ppo_losses_backward: ", name, " must hold one element");
    TORCH_CHECK(scalar.device() == logprobs.device(), "ppo_losses_backward: ", name,
                " must be on the device of logprobs");
    return scalar.to(dtype).contiguous();
  };
  const auto grad_dtype = rlhf_fast::accumulate_dtype(logprobs.scalar_type());
  const at::Tensor grad_policy = on_device(grad_policy_loss, grad_dtype, "grad_policy_loss");
  const at::Tensor grad_value = on_device(grad_value_loss, grad_dtype, "grad_value_loss");
  const at::Tensor count = on_device(valid_count, at::kLong, "valid_count");

  at::Tensor grad_logprobs = at::empty(logprobs.sizes(), logprobs.options());
  at::Tensor grad_values = has_values ? at::empty(logprobs.sizes(), logprobs.options())
                                      : at::empty({0}, logprobs.options());
  const rlhf_fast::PpoLossGradients gradients{grad_policy.data_ptr(), grad_value.data_ptr(),
                                              count.data_ptr<int64_t>(), grad_logprobs.data_ptr(),
                                              has_values ? grad_values.data_ptr() : nullptr};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logprobs.device().index()).stream();
  C10_CUDA_CHECK(rlhf_fast::ppo_losses_backward_launch(problem.description, gradients, stream));
  return {grad_logprobs, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast_C, CUDA, m) {
  m.impl("ppo_losses_forward", &ppo_losses_forward_cuda);
  m.impl("ppo_losses_backward", &ppo_losses_backward_cuda);
}
