// `ranking_loss` with its autograd in C++: one dispatcher call forward, the backward run by the C++ autograd
// engine. At the anchor's size (P=64, K=9) the kernels take tens of microseconds and a Python
// autograd.Function costs as much again; this keeps the whole op in C++. The forward and backward kernels are
// the device ops `ranking_loss_forward` / `ranking_loss_backward` (csrc/cpu/ranking.cpp, csrc/cuda/ranking.cpp),
// so this file is device-agnostic.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_forward(
    const at::Tensor& rewards, const at::Tensor& group_sizes, const std::optional<at::Tensor>& ranks,
    const std::optional<at::Tensor>& margins, double margin) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rlhf_fast_C::ranking_loss_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, double)>();
  return op.call(rewards, group_sizes, ranks, margins, margin);
}

at::Tensor call_backward(const at::Tensor& grad_loss, const at::Tensor& rewards,
                         const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& margins,
                         double margin, const at::Tensor& prompt_weights, const at::Tensor& prompt_ends) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rlhf_fast_C::ranking_loss_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, double, const at::Tensor&,
                                         const at::Tensor&)>();
  return op.call(grad_loss, rewards, ranks, margins, margin, prompt_weights, prompt_ends);
}

std::optional<at::Tensor> optional_of(const at::Tensor& tensor) {
  return tensor.defined() ? std::optional<at::Tensor>(tensor) : std::nullopt;
}

class RankingLossFunction : public torch::autograd::Function<RankingLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& rewards, const at::Tensor& group_sizes,
                               const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& margins,
                               double margin) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, accuracy, prompt_weights, prompt_ends] = call_forward(rewards, group_sizes, ranks, margins, margin);
    ctx->save_for_backward({rewards, ranks.value_or(at::Tensor()), margins.value_or(at::Tensor()),
                            prompt_weights, prompt_ends});
    ctx->saved_data["margin"] = margin;
    ctx->mark_non_differentiable({accuracy});
    return {loss, accuracy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) grad_loss = at::zeros({}, saved[3].options());
    const at::Tensor grad_rewards =
        call_backward(grad_loss, saved[0], optional_of(saved[1]), optional_of(saved[2]),
                      ctx->saved_data["margin"].toDouble(), saved[3], saved[4]);
    return {grad_rewards, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> ranking_loss_autograd(const at::Tensor& rewards, const at::Tensor& group_sizes,
                                                         const std::optional<at::Tensor>& ranks,
                                                         const std::optional<at::Tensor>& margins, double margin) {
  auto outputs = RankingLossFunction::apply(rewards, group_sizes, ranks, margins, margin);
  return {outputs[0], outputs[1]};
}

// Below autograd (inference mode, or a caller already under the autograd key): the forward alone.
std::tuple<at::Tensor, at::Tensor> ranking_loss_no_grad(const at::Tensor& rewards, const at::Tensor& group_sizes,
                                                        const std::optional<at::Tensor>& ranks,
                                                        const std::optional<at::Tensor>& margins, double margin) {
  auto [loss, accuracy, prompt_weights, prompt_ends] = call_forward(rewards, group_sizes, ranks, margins, margin);
  return {loss, accuracy};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast_C, Autograd, m) { m.impl("ranking_loss", &ranking_loss_autograd); }

TORCH_LIBRARY_IMPL(rlhf_fast_C, CompositeExplicitAutograd, m) { m.impl("ranking_loss", &ranking_loss_no_grad); }
