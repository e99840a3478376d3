// The sampler's bookkeeping after each decode step's draw, on the CPU (rlhf_fast/rollout/decode.py,
// `_DecodeProgram._emit`, whose torch ops are the reference and what runs on GPUs, where the step is a CUDA
// graph): a finished row emits the pad token; the column `step_index` of the outputs gets the tokens, the
// alive flags, the log-probs and the entropy (0 where finished); a row finishes at an EOS id; the tokens
// become the next step's input; `step_index` advances. About a dozen small ops as one loop over the rows:
// their fixed costs were a third of a decode step at batch 8 (bench/RESULTS.md).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace {

void check(const at::Tensor& tensor, at::ScalarType dtype, int64_t dim, int64_t rows, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == dtype && tensor.dim() == dim &&
                  tensor.size(0) == rows && tensor.is_contiguous(),
              "decode_record: ", name, " must be a contiguous ", dtype, " CPU tensor of ", dim,
              " dims and ", rows, " rows, got ", tensor.scalar_type(), " ", tensor.sizes());
}

void decode_record_cpu(const at::Tensor& tokens, const std::optional<at::Tensor>& logprobs,
                       const std::optional<at::Tensor>& entropy, at::IntArrayRef eos_ids, int64_t pad_token_id,
                       const at::Tensor& step_index, const at::Tensor& finished, const at::Tensor& response_ids,
                       const at::Tensor& response_mask, const std::optional<at::Tensor>& response_logprobs,
                       const std::optional<at::Tensor>& response_entropy, const at::Tensor& next_input) {
  const int64_t batch = tokens.size(0);
  check(tokens, at::kLong, 1, batch, "tokens");
  check(finished, at::kBool, 1, batch, "finished");
  check(response_ids, at::kLong, 2, batch, "response_ids");
  check(response_mask, at::kBool, 2, batch, "response_mask");
  check(next_input, at::kLong, 2, batch, "next_input");
  check(step_index, at::kLong, 1, 1, "step_index");
  const int64_t width = response_ids.size(1);
  TORCH_CHECK(response_mask.size(1) == width, "decode_record: response_mask must have ", width, " columns");
  const int64_t column = step_index.const_data_ptr<int64_t>()[0];
  TORCH_CHECK(0 <= column && column < width, "decode_record: step_index ", column, " is outside [0, ", width, ")");
  // A statistic is written where both it and its output are given.
  const auto statistic = [&](const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& output,
                             const char* name) -> std::pair<const float*, float*> {
    if (!values.has_value() || !output.has_value()) return {nullptr, nullptr};
    check(*values, at::kFloat, 1, batch, name);
    check(*output, at::kFloat, 2, batch, name);
    TORCH_CHECK(output->size(1) == width, "decode_record: the ", name, " output must have ", width, " columns");
    return {values->const_data_ptr<float>(), output->mutable_data_ptr<float>()};
  };
  const auto [logprob_in, logprob_out] = statistic(logprobs, response_logprobs, "logprobs");
  const auto [entropy_in, entropy_out] = statistic(entropy, response_entropy, "entropy");

  const int64_t* drawn = tokens.const_data_ptr<int64_t>();
  bool* done = finished.mutable_data_ptr<bool>();
  int64_t* ids = response_ids.mutable_data_ptr<int64_t>();
  bool* alive_out = response_mask.mutable_data_ptr<bool>();
  int64_t* next = next_input.mutable_data_ptr<int64_t>();
  const int64_t next_stride = next_input.size(1);
  for (int64_t b = 0; b < batch; ++b) {
    const bool alive = !done[b];
    const int64_t token = alive ? drawn[b] : pad_token_id;
    const int64_t at = b * width + column;
    ids[at] = token;
    alive_out[at] = alive;
    if (logprob_out != nullptr) logprob_out[at] = alive ? logprob_in[b] : 0.0f;
    if (entropy_out != nullptr) entropy_out[at] = alive ? entropy_in[b] : 0.0f;
    done[b] = done[b] || std::find(eos_ids.begin(), eos_ids.end(), token) != eos_ids.end();
    next[b * next_stride] = token;
  }
  step_index.mutable_data_ptr<int64_t>()[0] = column + 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) { m.impl("decode_record", &decode_record_cpu); }
