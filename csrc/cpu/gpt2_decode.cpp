// One GPT-2 decode step on the CPU: one token per row through every block, its key and value written into the
// static cache at `cache_index`, the final norm's output returned. The Python step in
// rlhf_fast/models/functional.py (`_gpt2_step`) is its reference, and what runs everywhere else (GPUs, where
// the step is replayed as a CUDA graph; dtypes other than float32 / float64; autocast).
//
// Why a kernel: at the sampler's batch sizes a step is about 40 small ops whose fixed costs outweigh their
// arithmetic, and torch's CPU flash-attention kernel, built for long queries, takes 2-3x a plain pass over the
// cache for one query. Here the matmuls stay ATen's (MKL / oneDNN); everything between them runs as loops over
// the rows: embeddings, layer norms, biases, GELU, residuals, the cache writes, and attention over the slots
// written so far (`cache_index` and before; every later slot must be masked, as the sampler's mask has it).
// bench/RESULTS.md has the measurement.
//
// The loops run on the calling thread: at these sizes each is microseconds, far below the millisecond a
// thread's wake-up is worth (cpu/parallel.h); the matmuls use ATen's threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/gelu.h"
#include "cpu/vector_math.h"

namespace {

// The weights of one block, in the order `weights` lists them (rlhf_fast/models/functional.py).
constexpr int64_t kTensorsPerBlock = 12;
enum BlockTensor : int64_t {
  kNorm1Weight, kNorm1Bias, kAttnWeight, kAttnBias, kAttnProjWeight, kAttnProjBias,
  kNorm2Weight, kNorm2Bias, kFcWeight, kFcBias, kMlpProjWeight, kMlpProjBias,
};

inline float exp_of_nonpositive(float z) { return rlhf_fast::cpu::exp_nonpositive(z); }
inline double exp_of_nonpositive(double z) { return std::exp(z); }

// The loops below are templates inlined into one entry point per element type; the float ones are built once per
// instruction set (cpu/vector_math.h), the double ones (the tests' dtype) once.
#if defined(__GNUC__)
#define RLHF_FAST_INLINE inline __attribute__((always_inline))
#else
#define RLHF_FAST_INLINE inline
#endif

// out[r] = (x[r] − mean) / sqrt(var + eps) · weight + bias for each row r of width `width`.
template <typename T>
RLHF_FAST_INLINE void layer_norm_rows(const T* x, const T* weight, const T* bias, T* out, int64_t rows, int64_t width,
                                      double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * width;
    T* result = out + r * width;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < width; ++i) sum += row[i];
    const T mean = sum / static_cast<T>(width);
    T squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < width; ++i) squares += (row[i] - mean) * (row[i] - mean);
    const T inv_std = T(1) / std::sqrt(squares / static_cast<T>(width) + static_cast<T>(eps));
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) result[i] = (row[i] - mean) * inv_std * weight[i] + bias[i];
  }
}

// x[r] += bias for each row r.
template <typename T>
RLHF_FAST_INLINE void add_bias_rows(T* x, const T* bias, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = x + r * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) row[i] += bias[i];
  }
}

// The new token's key and value (columns [d, 2d) and [2d, 3d) of qkv [B, 3d]) into slot `slot` of the caches
// [B, H, S, hd].
template <typename T>
RLHF_FAST_INLINE void write_cache(const T* qkv, T* keys, T* values, int64_t batch, int64_t heads, int64_t head_dim,
                                  int64_t slots, int64_t slot) {
  const int64_t width = heads * head_dim;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t at = ((b * heads + h) * slots + slot) * head_dim;
      const T* key = qkv + b * 3 * width + width + h * head_dim;
      const T* value = key + width;
      for (int64_t j = 0; j < head_dim; ++j) {
        keys[at + j] = key[j];
        values[at + j] = value[j];
      }
    }
  }
}

// out [B, d] = softmax(q·Kᵀ·scale + mask) · V per row and head over the first `used` slots; q from qkv [B, 3d],
// K and V [B, H, S, hd], mask [B, S] additive.
template <typename T>
RLHF_FAST_INLINE void attend(const T* qkv, const T* keys, const T* values, const T* mask, T* out, int64_t batch,
                             int64_t heads, int64_t head_dim, int64_t slots, int64_t used, T scale) {
  const int64_t width = heads * head_dim;
  std::vector<T> weights(used), sum_values(head_dim);
  for (int64_t b = 0; b < batch; ++b) {
    const T* row_mask = mask + b * slots;
    for (int64_t h = 0; h < heads; ++h) {
      const T* query = qkv + b * 3 * width + h * head_dim;
      const T* key = keys + (b * heads + h) * slots * head_dim;
      const T* value = values + (b * heads + h) * slots * head_dim;
      T max_score = -std::numeric_limits<T>::infinity();
      for (int64_t s = 0; s < used; ++s) {
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < head_dim; ++j) dot += query[j] * key[s * head_dim + j];
        const T score = dot * scale + row_mask[s];
        weights[s] = score;
        max_score = max_score > score ? max_score : score;
      }
      T total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t s = 0; s < used; ++s) {
        weights[s] = exp_of_nonpositive(weights[s] - max_score);
        total += weights[s];
      }
      for (int64_t j = 0; j < head_dim; ++j) sum_values[j] = 0;
      for (int64_t s = 0; s < used; ++s) {
        const T w = weights[s];
        if (w == T(0)) continue;  // a masked slot
#pragma omp simd
        for (int64_t j = 0; j < head_dim; ++j) sum_values[j] += w * value[s * head_dim + j];
      }
      T* result = out + b * width + h * head_dim;
      for (int64_t j = 0; j < head_dim; ++j) result[j] = sum_values[j] / total;
    }
  }
}

template <typename T>
RLHF_FAST_INLINE void decode_step(const at::Tensor& input_ids, const at::Tensor& position_ids,
                                  const at::Tensor& mask, int64_t slot, at::TensorList keys, at::TensorList values,
                                  const std::vector<at::Tensor>& weights, at::ArrayRef<double> scales,
                                  at::ArrayRef<double> eps, at::Tensor& hidden, at::Tensor& output) {
  const int64_t batch = hidden.size(0), width = hidden.size(1), layers = static_cast<int64_t>(keys.size());
  const int64_t heads = keys[0].size(1), slots = keys[0].size(2), head_dim = keys[0].size(3);
  const at::Tensor& token_embedding = weights[0];
  const at::Tensor& position_embedding = weights[1];
  const int64_t vocab = token_embedding.size(0), positions = position_embedding.size(0);
  const int64_t* ids = input_ids.const_data_ptr<int64_t>();
  const int64_t* pos = position_ids.const_data_ptr<int64_t>();
  T* h = hidden.mutable_data_ptr<T>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(0 <= ids[b] && ids[b] < vocab, "gpt2_decode_step: token id ", ids[b], " of row ", b,
                " is outside the vocabulary [0, ", vocab, ")");
    TORCH_CHECK(0 <= pos[b] && pos[b] < positions, "gpt2_decode_step: position ", pos[b], " of row ", b,
                " is outside [0, ", positions, ")");
    const T* token = token_embedding.const_data_ptr<T>() + ids[b] * width;
    const T* position = position_embedding.const_data_ptr<T>() + pos[b] * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) h[b * width + i] = token[i] + position[i];
  }

  at::Tensor normed = at::empty_like(hidden);
  at::Tensor qkv = at::empty({batch, 3 * width}, hidden.options());
  at::Tensor attended = at::empty_like(hidden);
  at::Tensor inner;
  const T* mask_data = mask.const_data_ptr<T>();
  for (int64_t layer = 0; layer < layers; ++layer) {
    const at::Tensor* block = weights.data() + 2 + layer * kTensorsPerBlock;
    const auto param = [&](BlockTensor which) { return block[which].const_data_ptr<T>(); };

    layer_norm_rows(h, param(kNorm1Weight), param(kNorm1Bias), normed.mutable_data_ptr<T>(), batch, width,
                    eps[2 * layer]);
    at::addmm_out(qkv, block[kAttnBias], normed, block[kAttnWeight]);
    write_cache(qkv.const_data_ptr<T>(), keys[layer].mutable_data_ptr<T>(), values[layer].mutable_data_ptr<T>(),
                batch, heads, head_dim, slots, slot);
    attend(qkv.const_data_ptr<T>(), keys[layer].const_data_ptr<T>(), values[layer].const_data_ptr<T>(), mask_data,
           attended.mutable_data_ptr<T>(), batch, heads, head_dim, slots, slot + 1, static_cast<T>(scales[layer]));
    hidden.addmm_(attended, block[kAttnProjWeight]);  // the residual: hidden += attended · W
    add_bias_rows(h, param(kAttnProjBias), batch, width);

    layer_norm_rows(h, param(kNorm2Weight), param(kNorm2Bias), normed.mutable_data_ptr<T>(), batch, width,
                    eps[2 * layer + 1]);
    inner = at::addmm(block[kFcBias], normed, block[kFcWeight]);
    rlhf_fast::cpu::gelu_tanh_forward(inner.const_data_ptr<T>(), inner.mutable_data_ptr<T>(), inner.numel());
    hidden.addmm_(inner, block[kMlpProjWeight]);
    add_bias_rows(h, param(kMlpProjBias), batch, width);
  }
  const at::Tensor* final_norm = weights.data() + 2 + layers * kTensorsPerBlock;
  layer_norm_rows(h, final_norm[0].const_data_ptr<T>(), final_norm[1].const_data_ptr<T>(),
                  output.mutable_data_ptr<T>(), batch, width, eps[2 * layers]);
}

RLHF_FAST_VECTOR_CLONES
void decode_step_f32(const at::Tensor& input_ids, const at::Tensor& position_ids, const at::Tensor& mask,
                     int64_t slot, at::TensorList keys, at::TensorList values, const std::vector<at::Tensor>& weights,
                     at::ArrayRef<double> scales, at::ArrayRef<double> eps, at::Tensor& hidden, at::Tensor& output) {
  decode_step<float>(input_ids, position_ids, mask, slot, keys, values, weights, scales, eps, hidden, output);
}

void decode_step_f64(const at::Tensor& input_ids, const at::Tensor& position_ids, const at::Tensor& mask,
                     int64_t slot, at::TensorList keys, at::TensorList values, const std::vector<at::Tensor>& weights,
                     at::ArrayRef<double> scales, at::ArrayRef<double> eps, at::Tensor& hidden, at::Tensor& output) {
  decode_step<double>(input_ids, position_ids, mask, slot, keys, values, weights, scales, eps, hidden, output);
}

void check_tensor(const at::Tensor& tensor, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu(), "gpt2_decode_step: ", name, " must be on the CPU, got ", tensor.device());
  TORCH_CHECK(tensor.scalar_type() == dtype, "gpt2_decode_step: ", name, " must be ", dtype, ", got ",
              tensor.scalar_type());
}

at::Tensor gpt2_decode_step_cpu(const at::Tensor& input_ids, const at::Tensor& position_ids, const at::Tensor& mask,
                                const at::Tensor& cache_index, at::TensorList keys, at::TensorList values,
                                at::TensorList weights, at::ArrayRef<double> scales, at::ArrayRef<double> eps) {
  const int64_t layers = static_cast<int64_t>(keys.size());
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(values.size()) == layers,
              "gpt2_decode_step: one key and one value cache per layer, got ", keys.size(), " and ", values.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 2 + kTensorsPerBlock * layers + 2, "gpt2_decode_step: ",
              layers, " layers take ", 2 + kTensorsPerBlock * layers + 2, " weights, got ", weights.size());
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == layers && static_cast<int64_t>(eps.size()) == 2 * layers + 1,
              "gpt2_decode_step: one scale per layer and one eps per layer norm");
  const at::ScalarType dtype = weights[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "gpt2_decode_step: weights must be float32 or float64, got ",
              dtype);
  const int64_t width = weights[0].size(1);
  const int64_t batch = input_ids.size(0);
  check_tensor(input_ids, at::kLong, "input_ids");
  check_tensor(position_ids, at::kLong, "position_ids");
  check_tensor(cache_index, at::kLong, "cache_index");
  check_tensor(mask, dtype, "mask");
  TORCH_CHECK(input_ids.numel() == batch && position_ids.numel() == batch,
              "gpt2_decode_step: input_ids and position_ids must be [B, 1]");
  TORCH_CHECK(cache_index.numel() == 1, "gpt2_decode_step: cache_index must hold one slot");
  const at::IntArrayRef cache_shape = keys[0].sizes();
  TORCH_CHECK(cache_shape.size() == 4 && cache_shape[0] == batch && cache_shape[1] * cache_shape[3] == width,
              "gpt2_decode_step: caches must be [B, heads, slots, head_dim] with heads * head_dim = ", width,
              ", got ", cache_shape);
  for (int64_t layer = 0; layer < layers; ++layer) {
    for (const at::Tensor& cache : {keys[layer], values[layer]}) {
      check_tensor(cache, dtype, "a cache");
      TORCH_CHECK(cache.sizes() == cache_shape && cache.is_contiguous(),
                  "gpt2_decode_step: every cache must be contiguous and shaped ", cache_shape);
    }
  }
  const int64_t slots = cache_shape[2];
  TORCH_CHECK(mask.numel() == batch * slots, "gpt2_decode_step: mask must be [B, 1, 1, ", slots, "]");
  const int64_t slot = cache_index.item<int64_t>();
  TORCH_CHECK(0 <= slot && slot < slots, "gpt2_decode_step: cache_index ", slot, " is outside [0, ", slots, ")");

  TORCH_CHECK(weights[1].dim() == 2 && weights[1].size(1) == width,
              "gpt2_decode_step: the position embedding must be [positions, ", width, "]");
  for (int64_t layer = 0; layer < layers; ++layer) {
    const at::Tensor* block = weights.data() + 2 + layer * kTensorsPerBlock;
    for (BlockTensor vector : {kNorm1Weight, kNorm1Bias, kAttnProjBias, kNorm2Weight, kNorm2Bias, kMlpProjBias}) {
      TORCH_CHECK(block[vector].numel() == width, "gpt2_decode_step: layer ", layer, " weight ", int(vector),
                  " must hold ", width, " values");
    }
    const int64_t inner = block[kFcWeight].size(-1);
    TORCH_CHECK(block[kAttnWeight].sizes() == at::IntArrayRef({width, 3 * width}) &&
                    block[kAttnBias].numel() == 3 * width &&
                    block[kAttnProjWeight].sizes() == at::IntArrayRef({width, width}) &&
                    block[kFcWeight].sizes() == at::IntArrayRef({width, inner}) && block[kFcBias].numel() == inner &&
                    block[kMlpProjWeight].sizes() == at::IntArrayRef({inner, width}),
                "gpt2_decode_step: layer ", layer, "'s matrices must be [d, 3d], [d, d], [d, inner], [inner, d]");
  }
  for (const at::Tensor* norm = weights.data() + weights.size() - 2; norm != weights.data() + weights.size(); ++norm) {
    TORCH_CHECK(norm->numel() == width, "gpt2_decode_step: the final norm's weight and bias must hold ", width,
                " values");
  }

  std::vector<at::Tensor> contiguous;
  contiguous.reserve(weights.size());
  for (const at::Tensor& weight : weights) {
    check_tensor(weight, dtype, "a weight");
    contiguous.push_back(weight.contiguous());
  }
  const at::Tensor ids = input_ids.contiguous(), positions = position_ids.contiguous(), masks = mask.contiguous();
  at::Tensor hidden = at::empty({batch, width}, weights[0].options());
  at::Tensor output = at::empty_like(hidden);
  if (dtype == at::kFloat) {
    decode_step_f32(ids, positions, masks, slot, keys, values, contiguous, scales, eps, hidden, output);
  } else {
    decode_step_f64(ids, positions, masks, slot, keys, values, contiguous, scales, eps, hidden, output);
  }
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) { m.impl("gpt2_decode_step", &gpt2_decode_step_cpu); }
