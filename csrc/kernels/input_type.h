// The input dtypes the CUDA kernels take, named without CUDA or torch headers so the kernels' problem
// descriptions (*.cuh) and the torch bindings (csrc/cuda/, through csrc/dtype.h) both include it.
#pragma once

namespace rlhf_fast {

// Each kernel accumulates in double for kFloat64 inputs and in float for the others.
enum class InputType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

}  // namespace rlhf_fast
