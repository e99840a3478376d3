// The dtype rules the torch bindings share: the kernels' InputType of a torch dtype, and the dtype an op
// accumulates and returns its float results in.
#pragma once

#include <ATen/ATen.h>

#include "kernels/input_type.h"

namespace rlhf_fast {

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
