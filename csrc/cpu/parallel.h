// How the CPU kernels split a loop over the intra-op threads.
//
// at::parallel_for runs a loop on the calling thread when it is shorter than its grain; past that it hands
// chunks to the thread pool and waits for all of them. On a machine whose other cores are busy, a woken
// thread can stay descheduled for a whole time slice: a 0.1 ms loop then takes milliseconds (GAE at 64 x 512
// went from 80 µs on one thread to 12 ms on two, bench/bench_cpu_threads.py). So a loop splits only when
// each thread gets about a millisecond of work, which a late thread's wake-up costs little against.
#pragma once

#include <algorithm>
#include <cstdint>

namespace rlhf_fast::cpu {

// One thread's share of work worth a wake-up, in nanoseconds.
constexpr double kMinNanosecondsPerThread = 1e6;

// The grain (items per chunk) of a loop whose items each take about `nanoseconds_per_item` on one thread
// (one-thread time of bench/bench_cpu_threads.py over its items, on the development CPU; rough is enough).
inline int64_t grain_for(double nanoseconds_per_item) {
  return std::max<int64_t>(1, static_cast<int64_t>(kMinNanosecondsPerThread / std::max(nanoseconds_per_item, 1e-3)));
}

}  // namespace rlhf_fast::cpu
