// GAE (advantages and returns) on the GPU: raw pointers and a stream, no torch headers.
//
// One launch computes, for every row of a [B, T] batch, the masked reverse recurrence
//     δ_t = r_t + γ·V_next − V_t,   A_t = δ_t + γλ·A_next,   R_t = A_t + V_t
// over the row's valid tokens ("next" = the row's next valid token, 0 after the last), and, with
// `whiten`, whitens the advantages over all valid tokens of the batch in the same launch.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/input_type.h"

namespace rlhf_fast {

struct GaeProblem {
  // [B, T] inputs with element strides {row, column}; rewards and values share `input_type`.
  const void* rewards;
  const void* values;
  const void* mask;  // bool or any integer type of `mask_itemsize` bytes (1, 2, 4, 8); nonzero = valid
  int64_t rewards_stride[2];
  int64_t values_stride[2];
  int64_t mask_stride[2];
  int mask_itemsize;
  InputType input_type;
  int64_t batch;
  int64_t steps;
  double gamma;
  double lam;
  bool whiten;
  double whiten_eps;  // (A − mean) / sqrt(unbiased var + whiten_eps); the value comes from Python
  // Contiguous [B, T] outputs: float32, or float64 when input_type is kFloat64.
  void* advantages;
  void* returns;
};

// Bytes of device scratch that gae_launch needs for `problem` on the current device (0 without whitening).
cudaError_t gae_workspace_bytes(const GaeProblem& problem, size_t* bytes);

// Enqueues the one GAE kernel on `stream`. With whitening it is a cooperative launch (see gae.cu).
cudaError_t gae_launch(const GaeProblem& problem, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace rlhf_fast
