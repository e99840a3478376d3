// `gelu_tanh` with its autograd in C++ (definition in rlhf_fast/ops/gelu.py): the activation runs once per
// layer and decoding step, where a Python autograd.Function would cost more than the kernel. The backward
// saves the input only and recomputes σ(2u) (csrc/cpu/gelu.cpp).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& input) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rlhf_fast_C::gelu_tanh", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(input);
}

at::Tensor call_backward(const at::Tensor& grad_output, const at::Tensor& input) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rlhf_fast_C::gelu_tanh_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_output, input);
}

class GeluTanhFunction : public torch::autograd::Function<GeluTanhFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input});
    return call_forward(input);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    return {call_backward(grad_outputs[0], saved[0])};
  }
};

at::Tensor gelu_tanh_autograd(const at::Tensor& input) { return GeluTanhFunction::apply(input); }

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast_C, Autograd, m) { m.impl("gelu_tanh", &gelu_tanh_autograd); }
