// Numbers the CPU and CUDA kernels share (no CUDA or torch headers: both compilers include this file).
// Their Python twins live in rlhf_fast/ops/_contract.py; tests/ops checks that the two agree.
#pragma once

namespace rlhf_fast {

// Completions per prompt of the ranking loss: one group fits a 16-wide tile (a half-warp on the GPU).
constexpr int kRankingMaxGroup = 16;

}  // namespace rlhf_fast
