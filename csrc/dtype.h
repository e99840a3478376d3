// The dtype rules the CPU and CUDA bindings share: the dtype an op accumulates and returns its float results
// in, and the CUDA kernels' InputType of a torch dtype.
#pragma once

#include <ATen/ATen.h>

#include "kernels/input_type.h"

namespace rlhf_fast {

// float64 for float64 inputs, float32 for the others (acc_t of every kernel, CPU and CUDA).
inline at::ScalarType accumulate_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// The error names the op and its argument: "<op>: <argument> must be float32/float64/bfloat16/float16".
inline InputType input_type_of(at::ScalarType dtype, const char* op, const char* argument) {
  switch (dtype) {
    case at::kFloat:
      return InputType::kFloat32;
    case at::kDouble:
      return InputType::kFloat64;
    case at::kBFloat16:
      return InputType::kBFloat16;
    case at::kHalf:
      return InputType::kFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": ", argument, " must be float32/float64/bfloat16/float16, got ", dtype);
  return InputType::kFloat32;  // unreachable
}

}  // namespace rlhf_fast
