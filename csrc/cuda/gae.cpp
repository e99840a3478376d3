// CUDA implementation of rlhf_fast_C::gae_forward (schema declared in csrc/cpu/gae.cpp): checks the tensors,
// allocates the outputs and the whitening scratch, and hands raw pointers to csrc/kernels/gae.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks/gae.h"
#include "dtype.h"
#include "kernels/gae.cuh"

namespace {

std::tuple<at::Tensor, at::Tensor> gae_forward_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                                    const at::Tensor& mask, double gamma, double lam,
                                                    bool whiten, double whiten_eps) {
  rlhf_fast::check_gae_args(rewards, values, mask);
  TORCH_CHECK(rewards.is_cuda() && values.device() == rewards.device() && mask.device() == rewards.device(),
              "rewards, values and mask must be on the same CUDA device");
  const c10::cuda::CUDAGuard device_guard(rewards.device());

  const auto input_type = rlhf_fast::input_type_of(rewards.scalar_type(), "gae_forward", "rewards");
  // The kernel reads any strides; only a dtype mismatch or a floating mask costs a conversion.
  const at::Tensor values_in = values.scalar_type() == rewards.scalar_type() ? values : values.to(rewards.scalar_type());
  const bool integer_mask = mask.scalar_type() == at::kBool || at::isIntegralType(mask.scalar_type(), false);
  const at::Tensor mask_in = integer_mask ? mask : mask.ne(0);

  const auto out_dtype = rlhf_fast::accumulate_dtype(rewards.scalar_type());
  auto advantages = at::empty(rewards.sizes(), rewards.options().dtype(out_dtype));
  auto returns = at::empty(rewards.sizes(), rewards.options().dtype(out_dtype));
  if (rewards.numel() == 0) return {advantages, returns};

  rlhf_fast::GaeProblem problem{};
  problem.rewards = rewards.data_ptr();
  problem.values = values_in.data_ptr();
  problem.mask = mask_in.data_ptr();
  problem.rewards_stride[0] = rewards.stride(0);
  problem.rewards_stride[1] = rewards.stride(1);
  problem.values_stride[0] = values_in.stride(0);
  problem.values_stride[1] = values_in.stride(1);
  problem.mask_stride[0] = mask_in.stride(0);
  problem.mask_stride[1] = mask_in.stride(1);
  problem.mask_itemsize = static_cast<int>(mask_in.element_size());
  problem.input_type = input_type;
  problem.batch = rewards.size(0);
  problem.steps = rewards.size(1);
  problem.gamma = gamma;
  problem.lam = lam;
  problem.whiten = whiten;
  problem.whiten_eps = whiten_eps;
  problem.advantages = advantages.data_ptr();
  problem.returns = returns.data_ptr();

  size_t workspace_bytes = 0;
  C10_CUDA_CHECK(rlhf_fast::gae_workspace_bytes(problem, &workspace_bytes));
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, rewards.options().dtype(at::kByte));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(rewards.device().index()).stream();
  C10_CUDA_CHECK(rlhf_fast::gae_launch(problem, workspace_bytes > 0 ? workspace.data_ptr() : nullptr,
                                       workspace_bytes, stream));
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast_C, CUDA, m) { m.impl("gae_forward", &gae_forward_cuda); }
