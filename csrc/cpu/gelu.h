// The tanh-approximated GELU's forward loops (csrc/cpu/gelu.cpp), for kernels that apply it to a buffer of
// their own (csrc/cpu/gpt2_decode.cpp).
#pragma once

#include <cstdint>

namespace rlhf_fast::cpu {

// y[i] = gelu_tanh(x[i]) for i < n; y may be x.
void gelu_tanh_forward(const float* x, float* y, int64_t n);
void gelu_tanh_forward(const double* x, double* y, int64_t n);

}  // namespace rlhf_fast::cpu
