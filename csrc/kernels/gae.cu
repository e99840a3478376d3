// GAE in one kernel launch: a block-wide reverse scan of affine maps per row, whitening fused through a
// cooperative-groups grid barrier.
//
// The recurrence. Walking a row backwards, each valid token t maps the carried state
// (next value, next advantage) = (v, a) to (V_t, r_t − V_t + γ·v + γλ·a); a masked token leaves it alone.
// A run of tokens therefore maps the state as (v, a) → (value, p·v + q·a + k) when it holds a valid token
// (`value` is V at its earliest valid token), or is the identity when it holds none. Such maps compose
// associatively (ThenEarlier below), so a row is a scan: each thread folds its kItems tokens into one map,
// cub::BlockScan gives every thread the composite of all later tokens, and the thread then replays its own
// tokens sequentially from the state that composite produces. Rows longer than one tile (kTile tokens) are
// processed tile by tile from the end, carrying the state.
//
// Whitening needs the mean and variance over every valid token of the batch before any advantage can be
// normalized: a grid-wide dependency. We choose a cooperative launch (grid = at most the number of blocks
// that fit on the device at once, blocks looping over rows) and one cg grid.sync(): each block publishes
// its (count, sum, sum of squares) in double, syncs, every block re-reduces the few hundred partials and
// normalizes its own rows. When every block owns one single-tile row (e.g. B=256, T≤1024) the advantages
// stay in registers across the barrier and are written once. The alternative, a last-block-done pattern,
// leaves the final normalization pass to one block (or needs a hand-made barrier, which is a cooperative
// launch without the guarantee of co-residency), so it is slower or unsafe.
#include "kernels/gae.cuh"
#include "kernels/input_type.cuh"

#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <atomic>
#include <climits>

namespace rlhf_fast {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kItems = 4;
constexpr int kTile = kThreads * kItems;
constexpr int kMaxDevices = 64;

// Masks arrive in their own integer width (bool, int8 ... int64): "valid" is a nonzero bit pattern.
__device__ __forceinline__ bool load_valid(const unsigned char* __restrict__ mask, int64_t offset, int itemsize) {
  switch (itemsize) {
    case 1:
      return mask[offset] != 0;
    case 2:
      return reinterpret_cast<const uint16_t*>(mask)[offset] != 0;
    case 4:
      return reinterpret_cast<const uint32_t*>(mask)[offset] != 0;
    default:
      return reinterpret_cast<const unsigned long long*>(mask)[offset] != 0;
  }
}

// The map a run of tokens applies to the carried state (see the file comment).
template <typename acc_t>
struct Segment {
  acc_t value;  // V at the run's earliest valid token: the "next value" handed to earlier tokens
  acc_t p;      // advantage out = p·(value in) + q·(advantage in) + k
  acc_t q;
  acc_t k;
  int has_valid;
};

template <typename acc_t>
__device__ __forceinline__ Segment<acc_t> identity_segment() {
  return {acc_t(0), acc_t(0), acc_t(1), acc_t(0), 0};
}

// Scan operator: `later` covers later time steps (it is applied first), `earlier` the tokens before it.
template <typename acc_t>
struct ThenEarlier {
  __device__ __forceinline__ Segment<acc_t> operator()(const Segment<acc_t>& later,
                                                       const Segment<acc_t>& earlier) const {
    if (!earlier.has_valid) return later;
    if (!later.has_valid) return earlier;
    return {earlier.value, earlier.q * later.p, earlier.q * later.q,
            earlier.p * later.value + earlier.q * later.k + earlier.k, 1};
  }
};

template <typename acc_t>
struct State {
  acc_t next_value;
  acc_t next_advantage;
};

template <typename acc_t>
__device__ __forceinline__ State<acc_t> apply(const Segment<acc_t>& segment, const State<acc_t>& state) {
  if (!segment.has_valid) return state;
  return {segment.value, segment.p * state.next_value + segment.q * state.next_advantage + segment.k};
}

struct Moments {
  double count;
  double sum;
  double sum_sq;
};

struct AddMoments {
  __device__ __forceinline__ Moments operator()(const Moments& a, const Moments& b) const {
    return {a.count + b.count, a.sum + b.sum, a.sum_sq + b.sum_sq};
  }
};

struct Layout {
  int64_t rewards_row, rewards_col;
  int64_t values_row, values_col;
  int64_t mask_row, mask_col;
  int mask_itemsize;
  int64_t batch, steps;
  double whiten_eps;
};

// Two blocks per SM in float32 (264 co-resident blocks on an H100/H200) keep B=256 at one row per block.
template <typename acc_t>
constexpr int kMinBlocksPerSm = sizeof(acc_t) == 4 ? 2 : 1;

template <typename input_t, typename acc_t, bool kWhiten>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<acc_t>)
    gae_kernel(const input_t* __restrict__ rewards, const input_t* __restrict__ values,
               const unsigned char* __restrict__ mask, Layout layout, acc_t gamma, acc_t decay,
               acc_t* __restrict__ advantages, acc_t* __restrict__ returns, double* __restrict__ partials) {
  using Scan = cub::BlockScan<Segment<acc_t>, kThreads>;
  using Reduce = cub::BlockReduce<Moments, kThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } shared;
  __shared__ acc_t whiten_mean, whiten_inv_std;

  const int64_t steps = layout.steps;
  const int64_t num_tiles = (steps + kTile - 1) / kTile;
  // Uniform over the grid: every block owns at most one row of one tile, so its advantages can wait in
  // registers for the whitening statistics instead of a round trip through memory.
  const bool keep_in_registers = kWhiten && num_tiles == 1 && layout.batch <= gridDim.x;

  Moments moments{0.0, 0.0, 0.0};
  acc_t kept_advantage[kItems];
  bool kept_valid[kItems];

  for (int64_t row = blockIdx.x; row < layout.batch; row += gridDim.x) {
    State<acc_t> carry{acc_t(0), acc_t(0)};  // state after the row's end: no next token
    for (int64_t tile = 0; tile < num_tiles; ++tile) {
      // Logical position j counts from the row's end (t = steps − 1 − j), so a forward scan runs backwards in time.
      const int64_t first = tile * kTile + static_cast<int64_t>(threadIdx.x) * kItems;
      acc_t reward[kItems], value[kItems];
      bool valid[kItems];
      Segment<acc_t> own = identity_segment<acc_t>();
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t j = first + i;
        const int64_t t = steps - 1 - j;
        valid[i] = false;
        reward[i] = value[i] = acc_t(0);
        if (j < steps) {
          // Rewards and values are read whatever the mask says, so all three loads are in flight at once.
          valid[i] = load_valid(mask, row * layout.mask_row + t * layout.mask_col, layout.mask_itemsize);
          reward[i] = widen(rewards[row * layout.rewards_row + t * layout.rewards_col]);
          value[i] = widen(values[row * layout.values_row + t * layout.values_col]);
        }
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (valid[i]) {
          own = ThenEarlier<acc_t>{}(own, Segment<acc_t>{value[i], gamma, decay, reward[i] - value[i], 1});
        }
      }
      Segment<acc_t> later, tile_total;
      Scan(shared.scan).ExclusiveScan(own, later, identity_segment<acc_t>(), ThenEarlier<acc_t>{}, tile_total);
      State<acc_t> state = apply(later, carry);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t j = first + i;
        if (j >= steps) break;
        const int64_t out = row * steps + (steps - 1 - j);
        acc_t advantage = acc_t(0), ret = acc_t(0);
        if (valid[i]) {
          advantage = reward[i] - value[i] + gamma * state.next_value + decay * state.next_advantage;
          state = {value[i], advantage};
          ret = advantage + value[i];
          if constexpr (kWhiten) {
            const double a = static_cast<double>(advantage);
            moments = {moments.count + 1.0, moments.sum + a, moments.sum_sq + a * a};
          }
        }
        kept_advantage[i] = advantage;
        kept_valid[i] = valid[i];
        if (!keep_in_registers) advantages[out] = advantage;
        returns[out] = ret;
      }
      carry = apply(tile_total, carry);
      __syncthreads();  // shared.scan is reused by the next tile
    }
  }

  if constexpr (kWhiten) {
    const Moments block_moments = Reduce(shared.reduce).Reduce(moments, AddMoments{});
    if (threadIdx.x == 0) {
      partials[3 * blockIdx.x + 0] = block_moments.count;
      partials[3 * blockIdx.x + 1] = block_moments.sum;
      partials[3 * blockIdx.x + 2] = block_moments.sum_sq;
    }
    cg::this_grid().sync();

    // Every block reduces all partials itself (a few KB from L2) rather than waiting on a second barrier.
    Moments total{0.0, 0.0, 0.0};
    for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += kThreads) {
      total = AddMoments{}(total, Moments{__ldcg(partials + 3 * b), __ldcg(partials + 3 * b + 1),
                                          __ldcg(partials + 3 * b + 2)});
    }
    __syncthreads();  // shared.reduce is reused
    total = Reduce(shared.reduce).Reduce(total, AddMoments{});
    if (threadIdx.x == 0) {
      const double count = total.count;
      const double mean = count > 0 ? total.sum / count : 0.0;
      const double var = count > 1 ? fmax(0.0, (total.sum_sq - total.sum * mean) / (count - 1)) : 0.0;
      whiten_mean = static_cast<acc_t>(mean);
      whiten_inv_std = static_cast<acc_t>(1.0 / sqrt(var + layout.whiten_eps));
    }
    __syncthreads();
    const acc_t mean = whiten_mean, inv_std = whiten_inv_std;

    if (keep_in_registers) {
      if (blockIdx.x < layout.batch) {
        const int64_t row = blockIdx.x;
        const int64_t first = static_cast<int64_t>(threadIdx.x) * kItems;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int64_t j = first + i;
          if (j >= steps) break;
          advantages[row * steps + (steps - 1 - j)] = kept_valid[i] ? (kept_advantage[i] - mean) * inv_std : acc_t(0);
        }
      }
    } else {
      // Each thread re-reads exactly the elements it wrote above (program order makes them visible).
      for (int64_t row = blockIdx.x; row < layout.batch; row += gridDim.x) {
        for (int64_t tile = 0; tile < num_tiles; ++tile) {
          const int64_t first = tile * kTile + static_cast<int64_t>(threadIdx.x) * kItems;
#pragma unroll
          for (int i = 0; i < kItems; ++i) {
            const int64_t j = first + i;
            if (j >= steps) break;
            const int64_t t = steps - 1 - j;
            if (load_valid(mask, row * layout.mask_row + t * layout.mask_col, layout.mask_itemsize)) {
              acc_t* slot = advantages + row * steps + t;
              *slot = (*slot - mean) * inv_std;
            }
          }
        }
      }
    }
  }
}

template <typename input_t, typename acc_t>
cudaError_t whiten_grid_blocks(ElementTypes<input_t, acc_t>, int64_t batch, int* blocks) {
  // The co-resident block count depends only on the kernel and the device: cache it per device.
  static std::atomic<int> resident_cache[kMaxDevices];
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  int resident = device < kMaxDevices ? resident_cache[device].load(std::memory_order_relaxed) : 0;
  if (resident == 0) {
    int cooperative = 0, multiprocessors = 0, per_multiprocessor = 0;
    if ((status = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device)) != cudaSuccess)
      return status;
    if (!cooperative) return cudaErrorNotSupported;
    if ((status = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
      return status;
    status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, gae_kernel<input_t, acc_t, true>,
                                                           kThreads, 0);
    if (status != cudaSuccess) return status;
    resident = multiprocessors * per_multiprocessor;
    if (resident <= 0) return cudaErrorCooperativeLaunchTooLarge;
    if (device < kMaxDevices) resident_cache[device].store(resident, std::memory_order_relaxed);
  }
  *blocks = static_cast<int>(std::min<int64_t>(batch, resident));
  return cudaSuccess;
}

template <typename input_t, typename acc_t>
cudaError_t launch_typed(ElementTypes<input_t, acc_t> types, const GaeProblem& problem, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  const Layout layout{problem.rewards_stride[0], problem.rewards_stride[1], problem.values_stride[0],
                      problem.values_stride[1],  problem.mask_stride[0],    problem.mask_stride[1],
                      problem.mask_itemsize,     problem.batch,             problem.steps,
                      problem.whiten_eps};
  const auto* rewards = static_cast<const input_t*>(problem.rewards);
  const auto* values = static_cast<const input_t*>(problem.values);
  const auto* mask = static_cast<const unsigned char*>(problem.mask);
  const auto gamma = static_cast<acc_t>(problem.gamma);
  const auto decay = static_cast<acc_t>(problem.gamma * problem.lam);
  auto* advantages = static_cast<acc_t*>(problem.advantages);
  auto* returns = static_cast<acc_t*>(problem.returns);

  if (!problem.whiten) {
    const auto grid = static_cast<unsigned>(std::min<int64_t>(problem.batch, INT_MAX));
    gae_kernel<input_t, acc_t, false><<<grid, kThreads, 0, stream>>>(rewards, values, mask, layout, gamma, decay,
                                                                    advantages, returns, nullptr);
    return cudaGetLastError();
  }

  int grid = 0;
  cudaError_t status = whiten_grid_blocks(types, problem.batch, &grid);
  if (status != cudaSuccess) return status;
  if (workspace == nullptr || workspace_bytes < static_cast<size_t>(grid) * 3 * sizeof(double))
    return cudaErrorInvalidValue;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attributes[1];
  attributes[0].id = cudaLaunchAttributeCooperative;
  attributes[0].val.cooperative = 1;
  config.attrs = attributes;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, gae_kernel<input_t, acc_t, true>, rewards, values, mask, layout, gamma, decay,
                            advantages, returns, static_cast<double*>(workspace));
}

}  // namespace

cudaError_t gae_workspace_bytes(const GaeProblem& problem, size_t* bytes) {
  *bytes = 0;
  if (!problem.whiten || problem.batch <= 0 || problem.steps <= 0) return cudaSuccess;
  int grid = 0;
  const cudaError_t status = dispatch_input_type(
      problem.input_type, [&](auto types) { return whiten_grid_blocks(types, problem.batch, &grid); });
  if (status == cudaSuccess) *bytes = static_cast<size_t>(grid) * 3 * sizeof(double);
  return status;
}

cudaError_t gae_launch(const GaeProblem& problem, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (problem.batch <= 0 || problem.steps <= 0) return cudaSuccess;
  if (problem.mask_itemsize != 1 && problem.mask_itemsize != 2 && problem.mask_itemsize != 4 &&
      problem.mask_itemsize != 8)
    return cudaErrorInvalidValue;
  return dispatch_input_type(problem.input_type, [&](auto types) {
    return launch_typed(types, problem, workspace, workspace_bytes, stream);
  });
}

}  // namespace rlhf_fast
