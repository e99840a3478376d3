// The compiled library's entry point: every op schema of the rlhf_fast_C namespace, in one place. The
// implementations register per dispatch key beside their code: csrc/cpu/<op>.cpp (CPU), csrc/cuda/<op>.cpp
// (CUDA), csrc/autograd/<op>.cpp (Autograd, device-agnostic). The Python ops call these through
// rlhf_fast/ops/_backend.py (`compiled`), with the arguments of the Python custom ops of the same name.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "kernels/constants.h"

TORCH_LIBRARY(rlhf_fast_C, m) {
  // GAE (rlhf_fast/ops/gae.py): whiten_eps comes from rlhf_fast/ops/_contract.py.
  m.def(
      "gae_forward(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam, bool whiten, "
      "float whiten_eps) -> (Tensor, Tensor)");

  // PPO losses (rlhf_fast/ops/ppo_loss.py): forward returns FORWARD_OUTPUTS, backward the two gradients.
  m.def(
      "ppo_losses_forward(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, Tensor? values, "
      "Tensor? old_values, Tensor? returns, float clip_coef, float value_clip) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ppo_losses_backward(Tensor grad_policy_loss, Tensor grad_value_loss, Tensor logprobs, Tensor old_logprobs, "
      "Tensor advantages, Tensor mask, Tensor? values, Tensor? old_values, Tensor? returns, Tensor valid_count, "
      "float clip_coef, float value_clip) -> (Tensor, Tensor)");

  // K-wise ranking loss (rlhf_fast/ops/ranking.py): the device kernels, and `ranking_loss`, forward and
  // backward wired by the C++ autograd engine (csrc/autograd/ranking.cpp).
  m.def(
      "ranking_loss_forward(Tensor rewards, Tensor group_sizes, Tensor? ranks, Tensor? margins, float margin)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ranking_loss_backward(Tensor grad_loss, Tensor rewards, Tensor? ranks, Tensor? margins, float margin,"
      " Tensor prompt_weights, Tensor prompt_ends) -> Tensor");
  m.def(
      "ranking_loss(Tensor rewards, Tensor group_sizes, Tensor? ranks, Tensor? margins, float margin)"
      " -> (Tensor, Tensor)");

  // Tanh-approximated GELU (rlhf_fast/ops/gelu.py): CPU kernels (csrc/cpu/gelu.cpp), autograd in C++
  // (csrc/autograd/gelu.cpp); CUDA tensors take torch's own kernel.
  m.def("gelu_tanh(Tensor input) -> Tensor");
  m.def("gelu_tanh_backward(Tensor grad_output, Tensor input) -> Tensor");

  // One decoding step's draw (rlhf_fast/ops/sample_tokens.py): tokens, their log-probs and the rows'
  // entropy from scaled logits and one uniform per row; CPU kernel in csrc/cpu/sample_tokens.cpp.
  m.def("sample_tokens(Tensor logits, Tensor uniform) -> (Tensor, Tensor, Tensor)");

  // The per-tile arithmetic of the log-prob ops' cpp backend (rlhf_fast/ops/logprob/cpp.py): fold a tile of
  // logits into the rows' running softmax statistics; dL/dz of a tile (`out` may be `logits` itself).
  // CPU kernels in csrc/cpu/logprob_tiles.cpp.
  m.def(
      "logprob_fold_tile(Tensor logits, Tensor local_targets, float inv_temp, Tensor(a!) max, Tensor(b!) sum_exp, "
      "Tensor(c!)? sum_shifted, Tensor(d!) target_logit) -> ()");
  m.def(
      "logprob_grad_tile(Tensor logits, Tensor local_targets, float inv_temp, Tensor lse, Tensor a, Tensor? b, "
      "Tensor? entropy, Tensor(e!) out) -> ()");

  // One GPT-2 decode step (rlhf_fast/models/functional.py, whose Python step is the reference): the new token's
  // key and value written into the caches at `cache_index`, the final norm's output [B, d] returned. `weights`:
  // wte, wpe, twelve per block (ln_1 weight, bias, c_attn weight, bias, attn c_proj weight, bias, ln_2 weight,
  // bias, c_fc weight, bias, mlp c_proj weight, bias), ln_f weight, bias. CPU kernel in csrc/cpu/gpt2_decode.cpp.
  m.def(
      "gpt2_decode_step(Tensor input_ids, Tensor position_ids, Tensor mask, Tensor cache_index, Tensor(a!)[] keys, "
      "Tensor(b!)[] values, Tensor[] weights, float[] scales, float[] eps) -> Tensor");

  // The sampler's bookkeeping after a decode step's draw (rlhf_fast/rollout/decode.py, `_emit`, whose torch ops
  // are the reference): outputs written at column `step_index`, finished rows, the next input, the index
  // advanced. CPU kernel in csrc/cpu/decode_record.cpp.
  m.def(
      "decode_record(Tensor tokens, Tensor? logprobs, Tensor? entropy, int[] eos_ids, int pad_token_id, "
      "Tensor(a!) step_index, Tensor(b!) finished, Tensor(c!) response_ids, Tensor(d!) response_mask, "
      "Tensor(e!)? response_logprobs, Tensor(f!)? response_entropy, Tensor(g!) next_input) -> ()");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlhf_fast compiled kernels (registered as torch.ops.rlhf_fast_C.*)";
#ifdef RLHF_FAST_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.attr("ranking_max_group") = rlhf_fast::kRankingMaxGroup;
}
