// Elementwise math the CPU kernels write in loops for the compiler to vectorize: no library call, no branch.
// The kernels build those loops once per instruction set with RLHF_FAST_VECTOR_CLONES; the loader picks the
// clone for the CPU it runs on.
#pragma once

#include <bit>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__)
#define RLHF_FAST_VECTOR_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define RLHF_FAST_VECTOR_CLONES
#endif

namespace rlhf_fast::cpu {

// e^z for z in [−87, 88] (callers clamp): z = n·ln 2 + r with |r| ≤ ½ln 2, e^r by Cephes' expf polynomial
// (relative error about 1e-7), 2^n written into the exponent bits.
inline float exp_clamped(float z) {
  constexpr float kRoundingShift = 12582912.0f;  // 1.5·2^23: adding and subtracting it rounds to an integer
  const float n = (z * 1.44269504088896341f + kRoundingShift) - kRoundingShift;
  const float r = (z - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;
  const float two_to_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return e_r * two_to_n;
}

// e^z for z ≤ 0, exactly 0 below −87 (where e^z is below float's normal range) and for z = −inf.
inline float exp_nonpositive(float z) {
  const float e = exp_clamped(z < -87.0f ? -87.0f : z);
  return z < -87.0f ? 0.0f : e;
}

}  // namespace rlhf_fast::cpu
