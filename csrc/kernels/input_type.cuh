// The device side of InputType (kernels/input_type.h): the C++ types of each input dtype, and the
// conversion of an input element to the type the kernels accumulate in.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/input_type.h"

namespace rlhf_fast {

// A pair of types carried by value, so a function template can deduce both from one argument.
template <typename input_t, typename acc_t>
struct ElementTypes {};

// Returns typed(ElementTypes<input_t, acc_t>{}) for the input type: acc_t is double for double inputs, float
// for the others. An out-of-range value is cudaErrorInvalidValue.
template <typename Typed>
cudaError_t dispatch_input_type(InputType type, const Typed& typed) {
  switch (type) {
    case InputType::kFloat32:
      return typed(ElementTypes<float, float>{});
    case InputType::kFloat64:
      return typed(ElementTypes<double, double>{});
    case InputType::kBFloat16:
      return typed(ElementTypes<__nv_bfloat16, float>{});
    case InputType::kFloat16:
      return typed(ElementTypes<__half, float>{});
  }
  return cudaErrorInvalidValue;
}

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }

}  // namespace rlhf_fast
