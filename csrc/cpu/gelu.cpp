// Tanh-approximated GELU (GPT-2's "gelu_new", torch's approximate="tanh") on the CPU, forward and backward,
// definition in rlhf_fast/ops/gelu.py:
//
//   gelu(x) = ½·x·(1 + tanh(u)), u = √(2/π)·(x + 0.044715·x³)   =   x·σ(2u)
//   gelu'(x) = σ(2u) + x·σ(2u)·(1 − σ(2u))·2·√(2/π)·(1 + 3·0.044715·x²)
//
// so an element costs one exponential each way (torch's CPU kernel for the tanh form took as long as the matmul
// feeding it; this one is 3x faster, bench/RESULTS.md). The float loops are written for the compiler to
// vectorize (cpu/vector_math.h: a polynomial e^z, no library call, no branch; one build per instruction set).
// bfloat16 and float16 go through the float loops a block at a time; float64 runs std::exp per element (the
// tests' dtype).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/gelu.h"
#include "cpu/parallel.h"
#include "cpu/vector_math.h"
#include "dtype.h"

namespace {

using rlhf_fast::cpu::exp_clamped;
using rlhf_fast::cpu::grain_for;

// One thread's time per element, either direction (see cpu/parallel.h).
constexpr double kNanosecondsPerElement = 0.5;
constexpr double kBeta = 0.7978845608028654;  // √(2/π)
constexpr double kKappa = 0.044715;

// σ(2u) as 1 / (1 + e^(−2u)); clamping keeps e^(−2u) finite and normal. Below the clamp (2u < −88) σ is
// set to 0, so gelu(x) is 0 for very negative x (and NaN at −inf) as in the tanh form.
inline float sigmoid_of_twice_u(float x) {
  const float two_u = 2.0f * static_cast<float>(kBeta) * (x + static_cast<float>(kKappa) * x * x * x);
  const float z = std::min(std::max(-two_u, -87.0f), 88.0f);
  const float s = 1.0f / (1.0f + exp_clamped(z));
  return -two_u >= 88.0f ? 0.0f : s;
}

RLHF_FAST_VECTOR_CLONES
void forward_f32(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * sigmoid_of_twice_u(x[i]);
}

RLHF_FAST_VECTOR_CLONES
void backward_f32(const float* grad, const float* x, float* grad_x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float s = sigmoid_of_twice_u(v);
    const float du = 2.0f * static_cast<float>(kBeta) * (1.0f + 3.0f * static_cast<float>(kKappa) * v * v);
    grad_x[i] = grad[i] * (s + v * s * (1.0f - s) * du);
  }
}

double sigmoid_of_twice_u(double x) {
  const double two_u = 2.0 * kBeta * (x + kKappa * x * x * x);
  return 1.0 / (1.0 + std::exp(-two_u));
}

void forward_f64(const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * sigmoid_of_twice_u(x[i]);
}

void backward_f64(const double* grad, const double* x, double* grad_x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i];
    const double s = sigmoid_of_twice_u(v);
    grad_x[i] = grad[i] * (s + v * s * (1.0 - s) * 2.0 * kBeta * (1.0 + 3.0 * kKappa * v * v));
  }
}

// bfloat16 / float16: blocks widened to float, run through the float loop, narrowed back.
constexpr int64_t kBlock = 256;

template <typename scalar_t>
void forward_reduced(const scalar_t* x, scalar_t* y, int64_t n) {
  float in[kBlock], out[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t count = std::min(kBlock, n - start);
    for (int64_t i = 0; i < count; ++i) in[i] = static_cast<float>(x[start + i]);
    forward_f32(in, out, count);
    for (int64_t i = 0; i < count; ++i) y[start + i] = static_cast<scalar_t>(out[i]);
  }
}

template <typename scalar_t>
void backward_reduced(const scalar_t* grad, const scalar_t* x, scalar_t* grad_x, int64_t n) {
  float g[kBlock], in[kBlock], out[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t count = std::min(kBlock, n - start);
    for (int64_t i = 0; i < count; ++i) {
      g[i] = static_cast<float>(grad[start + i]);
      in[i] = static_cast<float>(x[start + i]);
    }
    backward_f32(g, in, out, count);
    for (int64_t i = 0; i < count; ++i) grad_x[start + i] = static_cast<scalar_t>(out[i]);
  }
}

// One overload per element type, so the dispatch below picks the loop by argument type.
void forward_loop(const float* x, float* y, int64_t n) { forward_f32(x, y, n); }
void forward_loop(const double* x, double* y, int64_t n) { forward_f64(x, y, n); }
template <typename scalar_t>
void forward_loop(const scalar_t* x, scalar_t* y, int64_t n) { forward_reduced(x, y, n); }

void backward_loop(const float* grad, const float* x, float* grad_x, int64_t n) { backward_f32(grad, x, grad_x, n); }
void backward_loop(const double* grad, const double* x, double* grad_x, int64_t n) {
  backward_f64(grad, x, grad_x, n);
}
template <typename scalar_t>
void backward_loop(const scalar_t* grad, const scalar_t* x, scalar_t* grad_x, int64_t n) {
  backward_reduced(grad, x, grad_x, n);
}

at::Tensor gelu_tanh_cpu(const at::Tensor& input) {
  rlhf_fast::input_type_of(input.scalar_type(), "gelu_tanh", "input");
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gelu_tanh", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, numel, grain_for(kNanosecondsPerElement), [&](int64_t begin, int64_t end) {
      forward_loop(in + begin, out + begin, end - begin);
    });
  });
  return y;
}

at::Tensor gelu_tanh_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input) {
  rlhf_fast::input_type_of(input.scalar_type(), "gelu_tanh", "input");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "gelu_tanh_backward: grad_output has shape ",
              grad_output.sizes(), ", input ", input.sizes());
  const at::Tensor x = input.contiguous();
  const at::Tensor grad = grad_output.to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gelu_tanh_backward", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* out = grad_x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, numel, grain_for(kNanosecondsPerElement), [&](int64_t begin, int64_t end) {
      backward_loop(g + begin, in + begin, out + begin, end - begin);
    });
  });
  return grad_x;
}

}  // namespace

namespace rlhf_fast::cpu {

void gelu_tanh_forward(const float* x, float* y, int64_t n) { forward_f32(x, y, n); }
void gelu_tanh_forward(const double* x, double* y, int64_t n) { forward_f64(x, y, n); }

}  // namespace rlhf_fast::cpu

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("gelu_tanh", &gelu_tanh_cpu);
  m.impl("gelu_tanh_backward", &gelu_tanh_backward_cpu);
}
