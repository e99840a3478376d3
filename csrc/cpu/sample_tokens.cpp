// One decoding step's token choice on the CPU (definition in rlhf_fast/ops/sample_tokens.py): per row of
// scaled logits, the softmax normalizer, an inverse-CDF draw for the row's uniform, and the drawn token's
// log-prob and the row's entropy, in two passes over the row instead of the dozen [B, V] tensors the torch
// composition (softmax, cumsum, searchsorted twice, log_softmax, gather, exp, products, sum) writes.
//
// The CDF accumulates in double (block sums of 16 in float), as torch's CPU cumsum of float accumulates in
// double, and the token is the first whose cumulative mass exceeds U·total; when U·total rounds to the total,
// the last token with mass. Logits of −inf (filtered tokens) have no mass and are never drawn.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/vector_math.h"

namespace {

using rlhf_fast::cpu::grain_for;

// One thread's time per logit (both passes) (see cpu/parallel.h).
constexpr double kNanosecondsPerLogit = 1.5;

constexpr int64_t kBlock = 16;  // the CDF walk first skips whole blocks of this many tokens

RLHF_FAST_VECTOR_CLONES
float row_max(const float* logits, int64_t vocab) {
  float max_logit = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : max_logit)
  // Written as a select, not std::max, which GCC 12 leaves scalar under `omp simd reduction(max)`.
  for (int64_t v = 0; v < vocab; ++v) max_logit = max_logit > logits[v] ? max_logit : logits[v];
  return max_logit;
}

// e^(x − max) for a row into `weights`, and each block's sum into `block_sums`; returns the row's total.
RLHF_FAST_VECTOR_CLONES
double row_weights(const float* logits, float max_logit, float* weights, double* block_sums, int64_t vocab) {
  double total = 0.0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t stop = std::min(start + kBlock, vocab);
    float block = 0.0f;
#pragma omp simd reduction(+ : block)
    for (int64_t v = start; v < stop; ++v) {
      weights[v] = rlhf_fast::cpu::exp_nonpositive(logits[v] - max_logit);
      block += weights[v];
    }
    block_sums[start / kBlock] = block;
    total += block;
  }
  return total;
}

// Σ weight · (logit − max), for the entropy; terms with no weight (−inf logits) add nothing.
RLHF_FAST_VECTOR_CLONES
float weighted_logits(const float* logits, float max_logit, const float* weights, int64_t vocab) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t v = 0; v < vocab; ++v) sum += weights[v] > 0.0f ? weights[v] * (logits[v] - max_logit) : 0.0f;
  return sum;
}

// The first token whose cumulative weight exceeds `target`, or −1: whole blocks first, then within one.
int64_t first_above(const float* weights, const double* block_sums, int64_t vocab, double target) {
  double cumulative = 0.0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const double block = block_sums[start / kBlock];
    if (cumulative + block <= target) {
      cumulative += block;
      continue;
    }
    const int64_t stop = std::min(start + kBlock, vocab);
    for (int64_t v = start; v < stop; ++v) {
      cumulative += weights[v];
      if (cumulative > target) return v;
    }
  }
  return -1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_tokens_cpu(const at::Tensor& logits_in,
                                                                 const at::Tensor& uniform_in) {
  TORCH_CHECK(logits_in.dim() == 2, "sample_tokens: logits must be [B, V], got ", logits_in.sizes());
  TORCH_CHECK(logits_in.scalar_type() == at::kFloat, "sample_tokens: logits must be float32, got ",
              logits_in.scalar_type());
  const int64_t batch = logits_in.size(0), vocab = logits_in.size(1);
  TORCH_CHECK(vocab > 0, "sample_tokens: the vocabulary is empty");
  TORCH_CHECK(uniform_in.numel() == batch && uniform_in.scalar_type() == at::kFloat,
              "sample_tokens: uniform must be [B] float32 with B = ", batch);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor uniform = uniform_in.reshape({batch}).contiguous();
  at::Tensor tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({batch}, logits.options());
  at::Tensor entropy = at::empty({batch}, logits.options());
  const float* x = logits.const_data_ptr<float>();
  const float* u = uniform.const_data_ptr<float>();
  int64_t* token_out = tokens.mutable_data_ptr<int64_t>();
  float* logprob_out = logprobs.mutable_data_ptr<float>();
  float* entropy_out = entropy.mutable_data_ptr<float>();

  at::parallel_for(0, batch, grain_for(kNanosecondsPerLogit * static_cast<double>(vocab)), [&](int64_t begin,
                                                                                               int64_t end) {
    std::vector<float> weights(vocab);
    std::vector<double> block_sums((vocab + kBlock - 1) / kBlock);
    for (int64_t row = begin; row < end; ++row) {
      const float* row_logits = x + row * vocab;
      const float max_logit = row_max(row_logits, vocab);
      if (!std::isfinite(max_logit)) {  // no token with mass (all −inf), or a +inf / NaN logit
        token_out[row] = 0;
        logprob_out[row] = entropy_out[row] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      const double total = row_weights(row_logits, max_logit, weights.data(), block_sums.data(), vocab);
      int64_t token = first_above(weights.data(), block_sums.data(), vocab, static_cast<double>(u[row]) * total);
      if (token < 0) {  // U·total rounded to the total: the last token with mass
        token = vocab - 1;
        while (token > 0 && weights[token] == 0.0f) --token;
      }
      const float log_total = static_cast<float>(std::log(total));
      token_out[row] = token;
      logprob_out[row] = row_logits[token] - max_logit - log_total;
      entropy_out[row] =
          log_total - weighted_logits(row_logits, max_logit, weights.data(), vocab) / static_cast<float>(total);
    }
  });
  return {tokens, logprobs, entropy};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) { m.impl("sample_tokens", &sample_tokens_cpu); }
