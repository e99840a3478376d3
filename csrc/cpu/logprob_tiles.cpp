// The per-tile arithmetic of the log-prob ops' `cpp` backend (rlhf_fast/ops/logprob/cpp.py) on the CPU: the
// backend tiles the logits as the `chunked` one does (a tile comes from a GEMM of hidden × LM head, or is a
// block of the caller's logits); these kernels replace the dozen [n, C] torch passes per tile (max, shift,
// exp, clamp, sums, products, scatter) with one or two passes per row.
//
// logprob_fold_tile: folds a tile z = logits · inv_temp into each row's running online-softmax statistics
//   (max m, Σ e^(z−m), Σ e^(z−m)·(z−m) for the entropy, and z at the row's target when the target falls in
//   this tile), rescaling what earlier tiles of the row gathered to the new max.
// logprob_grad_tile: dL/dz for a tile, with a = dL/dlogp (+ the KL's share), b = dL/dH and log p = z − lse:
//   dL/dz_k = a · (1[k = y] − p_k) − b · p_k · (log p_k + H). `out` may be `logits` itself.
//
// float32 tiles use the polynomial exponential of cpu/vector_math.h, float64 (a testing dtype) std::exp.
// Entries of −inf have p = 0 and add nothing (no NaN from 0 · −inf); a NaN or +inf logit makes its row NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

#include "cpu/parallel.h"
#include "cpu/vector_math.h"

namespace {

using rlhf_fast::cpu::grain_for;

// One thread's time per logit of a tile (see cpu/parallel.h).
constexpr double kNanosecondsPerLogit = 0.5;

inline float exp_of_nonpositive(float z) { return rlhf_fast::cpu::exp_nonpositive(z); }
inline double exp_of_nonpositive(double z) { return std::exp(z); }

// Always inlined, so each instruction-set clone below compiles its loops for its own vector width.
template <typename T>
__attribute__((always_inline)) inline void fold_rows(const T* logits, int64_t row_stride, int64_t columns,
                                                     const int64_t* targets, T inv_temp, T* max, T* sum_exp,
                                                     T* sum_shifted, T* target_logit, int64_t begin, int64_t end) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t row = begin; row < end; ++row) {
    const T* x = logits + row * row_stride;
    const T old_max = max[row];
    T row_max = kNegInf;
    // A select, not std::max, which GCC 12 leaves scalar under `omp simd reduction(max)`.
#pragma omp simd reduction(max : row_max)
    for (int64_t k = 0; k < columns; ++k) row_max = row_max > x[k] ? row_max : x[k];
    const T new_max = std::max(old_max, row_max * inv_temp);
    const T shift = new_max == kNegInf ? T(0) : new_max;  // a row of −inf so far: subtract 0
    const int64_t target = targets[row];
    if (target >= 0 && target < columns) target_logit[row] += x[target] * inv_temp;
    // Σ e^(z−shift), and Σ e^(z−shift)·(z−shift) for the entropy.
    T tile_sum = 0, tile_shifted = 0;
    if (sum_shifted != nullptr) {
#pragma omp simd reduction(+ : tile_sum, tile_shifted)
      for (int64_t k = 0; k < columns; ++k) {
        const T z = x[k] * inv_temp - shift;
        const T e = exp_of_nonpositive(z);
        tile_sum += e;
        tile_shifted += e > 0 ? e * z : T(0);
      }
    } else {
#pragma omp simd reduction(+ : tile_sum)
      for (int64_t k = 0; k < columns; ++k) tile_sum += exp_of_nonpositive(x[k] * inv_temp - shift);
    }
    const T rescale = exp_of_nonpositive(old_max - shift);  // 0 when the row had no finite logit yet
    if (sum_shifted != nullptr) {
      const T moved = old_max == kNegInf ? T(0) : old_max - shift;
      sum_shifted[row] = rescale * (sum_shifted[row] + moved * sum_exp[row]) + tile_shifted;
    }
    sum_exp[row] = sum_exp[row] * rescale + tile_sum;
    max[row] = new_max;
  }
}

template <typename T>
__attribute__((always_inline)) inline void grad_rows(const T* logits, int64_t row_stride, T* out, int64_t out_stride,
                                                     int64_t columns, const int64_t* targets, T inv_temp,
                                                     const T* lse, const T* a, const T* b, const T* entropy,
                                                     int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const T* x = logits + row * row_stride;
    T* g = out + row * out_stride;
    const T row_lse = lse[row], row_a = a[row];
    if (b == nullptr) {
#pragma omp simd
      for (int64_t k = 0; k < columns; ++k) g[k] = -row_a * exp_of_nonpositive(x[k] * inv_temp - row_lse);
    } else {
      const T row_b = b[row], row_entropy = entropy[row];
#pragma omp simd
      for (int64_t k = 0; k < columns; ++k) {
        const T log_p = x[k] * inv_temp - row_lse;
        const T p = exp_of_nonpositive(log_p);
        g[k] = p > 0 ? -p * (row_a + row_b * (log_p + row_entropy)) : T(0);
      }
    }
    const int64_t target = targets[row];
    if (target >= 0 && target < columns) g[target] += row_a;
  }
}

// The float32 loops, built once per instruction set (cpu/vector_math.h); float64 takes the templates as they are.
RLHF_FAST_VECTOR_CLONES
void fold_rows_f32(const float* logits, int64_t row_stride, int64_t columns, const int64_t* targets, float inv_temp,
                   float* max, float* sum_exp, float* sum_shifted, float* target_logit, int64_t begin, int64_t end) {
  fold_rows<float>(logits, row_stride, columns, targets, inv_temp, max, sum_exp, sum_shifted, target_logit, begin, end);
}

RLHF_FAST_VECTOR_CLONES
void grad_rows_f32(const float* logits, int64_t row_stride, float* out, int64_t out_stride, int64_t columns,
                   const int64_t* targets, float inv_temp, const float* lse, const float* a, const float* b,
                   const float* entropy, int64_t begin, int64_t end) {
  grad_rows<float>(logits, row_stride, out, out_stride, columns, targets, inv_temp, lse, a, b, entropy, begin, end);
}

template <typename T>
void fold_rows_any(const T* logits, int64_t row_stride, int64_t columns, const int64_t* targets, T inv_temp, T* max,
                   T* sum_exp, T* sum_shifted, T* target_logit, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, float>) {
    fold_rows_f32(logits, row_stride, columns, targets, inv_temp, max, sum_exp, sum_shifted, target_logit, begin, end);
  } else {
    fold_rows<T>(logits, row_stride, columns, targets, inv_temp, max, sum_exp, sum_shifted, target_logit, begin, end);
  }
}

template <typename T>
void grad_rows_any(const T* logits, int64_t row_stride, T* out, int64_t out_stride, int64_t columns,
                   const int64_t* targets, T inv_temp, const T* lse, const T* a, const T* b, const T* entropy,
                   int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, float>) {
    grad_rows_f32(logits, row_stride, out, out_stride, columns, targets, inv_temp, lse, a, b, entropy, begin, end);
  } else {
    grad_rows<T>(logits, row_stride, out, out_stride, columns, targets, inv_temp, lse, a, b, entropy, begin, end);
  }
}

void check_tile(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, op, ": logits must be [n, C] with unit column stride, got ",
              logits.sizes(), " strides ", logits.strides());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, op,
              ": logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong, op,
              ": local_targets must be [n] int64 with n = ", logits.size(0));
}

void check_row_stat(const at::Tensor& stat, const at::Tensor& logits, const char* name, const char* op) {
  TORCH_CHECK(stat.dim() == 1 && stat.size(0) == logits.size(0) && stat.is_contiguous() &&
                  stat.scalar_type() == logits.scalar_type(),
              op, ": ", name, " must be a contiguous [n] tensor of the logits' dtype (", logits.scalar_type(),
              "), got ", stat.scalar_type(), " ", stat.sizes());
}

void logprob_fold_tile_cpu(const at::Tensor& logits, const at::Tensor& local_targets_in, double inv_temp,
                           const at::Tensor& max, const at::Tensor& sum_exp,
                           const std::optional<at::Tensor>& sum_shifted, const at::Tensor& target_logit) {
  constexpr const char* kOp = "logprob_fold_tile";
  check_tile(logits, local_targets_in, kOp);
  check_row_stat(max, logits, "max", kOp);
  check_row_stat(sum_exp, logits, "sum_exp", kOp);
  check_row_stat(target_logit, logits, "target_logit", kOp);
  if (sum_shifted) check_row_stat(*sum_shifted, logits, "sum_shifted", kOp);
  const at::Tensor local_targets = local_targets_in.contiguous();
  const int64_t rows = logits.size(0), columns = logits.size(1);
  if (rows == 0 || columns == 0) return;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kOp, [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* targets = local_targets.const_data_ptr<int64_t>();
    scalar_t* shifted = sum_shifted ? sum_shifted->mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, grain_for(kNanosecondsPerLogit * static_cast<double>(columns)),
                     [&](int64_t begin, int64_t end) {
                       fold_rows_any<scalar_t>(x, logits.stride(0), columns, targets, static_cast<scalar_t>(inv_temp),
                                           max.mutable_data_ptr<scalar_t>(), sum_exp.mutable_data_ptr<scalar_t>(),
                                           shifted, target_logit.mutable_data_ptr<scalar_t>(), begin, end);
                     });
  });
}

void logprob_grad_tile_cpu(const at::Tensor& logits, const at::Tensor& local_targets_in, double inv_temp,
                           const at::Tensor& lse, const at::Tensor& a, const std::optional<at::Tensor>& b,
                           const std::optional<at::Tensor>& entropy, const at::Tensor& out) {
  constexpr const char* kOp = "logprob_grad_tile";
  check_tile(logits, local_targets_in, kOp);
  check_row_stat(lse, logits, "lse", kOp);
  check_row_stat(a, logits, "a", kOp);
  TORCH_CHECK(b.has_value() == entropy.has_value(), kOp, ": b and entropy come together");
  if (b) {
    check_row_stat(*b, logits, "b", kOp);
    check_row_stat(*entropy, logits, "entropy", kOp);
  }
  TORCH_CHECK(out.sizes() == logits.sizes() && out.stride(1) == 1 && out.scalar_type() == logits.scalar_type(), kOp,
              ": out must have the logits' shape and dtype and unit column stride");
  const at::Tensor local_targets = local_targets_in.contiguous();
  const int64_t rows = logits.size(0), columns = logits.size(1);
  if (rows == 0 || columns == 0) return;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kOp, [&] {
    const scalar_t* b_data = b ? b->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* entropy_data = entropy ? entropy->const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, grain_for(kNanosecondsPerLogit * static_cast<double>(columns)),
                     [&](int64_t begin, int64_t end) {
                       grad_rows_any<scalar_t>(logits.const_data_ptr<scalar_t>(), logits.stride(0),
                                           out.mutable_data_ptr<scalar_t>(), out.stride(0), columns,
                                           local_targets.const_data_ptr<int64_t>(), static_cast<scalar_t>(inv_temp),
                                           lse.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b_data,
                                           entropy_data, begin, end);
                     });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("logprob_fold_tile", &logprob_fold_tile_cpu);
  m.impl("logprob_grad_tile", &logprob_grad_tile_cpu);
}
