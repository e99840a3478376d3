// K-wise ranking loss on the CPU (definition in rlhf_fast/ops/ranking.py): prompts in parallel, each group
// (K ≤ 16) held in small local arrays and its C(K, 2) pairs visited in registers; no [P, K, K] tensor.
//
// Forward: per-prompt (Σ −log σ, #pairs, #correct), then one ordered reduction over prompts (deterministic).
// Backward: d loss / d r_i = grad · w_p · Σ_j ∓σ(−logit_ij), w_p = 1 / (#pairs_p · #prompts with a pair).
//
// Group boundaries come from the inclusive cumulative sum of group_sizes. Groups are clamped to 16
// completions and to the rewards' length, so inputs that skipped the Python checks cannot read out of bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "checks/ranking.h"
#include "cpu/parallel.h"
#include "dtype.h"
#include "kernels/constants.h"

namespace {

using rlhf_fast::cpu::grain_for;

constexpr int64_t kMaxGroup = rlhf_fast::kRankingMaxGroup;
// One thread's time per prompt of the forward or the backward, at the largest group (see cpu/parallel.h).
constexpr double kNanosecondsPerPrompt = 500.0;

// σ(−x) = 1 / (1 + e^x); e^x overflowing to inf gives the right limit 0.
template <typename acc_t>
inline acc_t sigmoid_of_negative(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(x));
}

// One prompt's completions: rewards, rewards − per-completion margin, and ranks.
template <typename acc_t>
struct Group {
  int64_t start = 0;
  int64_t size = 0;
  acc_t reward[kMaxGroup];
  acc_t shifted[kMaxGroup];
  int64_t rank[kMaxGroup];
};

template <typename scalar_t, typename acc_t>
struct Inputs {
  const scalar_t* rewards;
  int64_t rewards_stride;
  int64_t num_completions;
  const int64_t* ranks;  // contiguous, or nullptr: position in group
  const acc_t* margins;  // contiguous, or nullptr
  const int64_t* ends;   // [P] inclusive cumulative group sizes

  Group<acc_t> load(int64_t prompt) const {
    Group<acc_t> group;
    group.start = prompt == 0 ? 0 : ends[prompt - 1];
    const int64_t end = std::min(ends[prompt], num_completions);
    if (group.start < 0 || group.start >= end) return group;
    group.size = std::min(end - group.start, kMaxGroup);
    for (int64_t k = 0; k < group.size; ++k) {
      const int64_t index = group.start + k;
      group.reward[k] = static_cast<acc_t>(rewards[index * rewards_stride]);
      group.shifted[k] = margins ? group.reward[k] - margins[index] : group.reward[k];
      group.rank[k] = ranks ? ranks[index] : k;
    }
    return group;
  }
};

constexpr int64_t kMaxPairs = kMaxGroup * (kMaxGroup - 1) / 2;

// A group's untied pairs (i < j), each once, in row order, with sign = +1 when i is ranked above j and −1
// when below, and the logit of the better one: sign·(s_i − s_j) − margin. Listing them first keeps the loops
// below free of calls and of unpredictable branches (random ranks and rewards would otherwise mispredict
// about every other pair), and lets the exp loop run back to back.
template <typename acc_t>
struct PairList {
  int64_t count = 0;
  int64_t correct = 0;  // pairs whose better completion has the higher reward
  int8_t first[kMaxPairs];
  int8_t second[kMaxPairs];
  acc_t sign[kMaxPairs];
  acc_t logit[kMaxPairs];
};

template <typename acc_t>
void list_pairs(const Group<acc_t>& group, acc_t margin, PairList<acc_t>& pairs) {
  for (int64_t i = 0; i < group.size; ++i) {
    for (int64_t j = i + 1; j < group.size; ++j) {
      if (group.rank[i] == group.rank[j]) continue;  // a tie forms no pair
      const acc_t sign = group.rank[i] < group.rank[j] ? acc_t(1) : acc_t(-1);
      const int64_t k = pairs.count++;
      pairs.first[k] = static_cast<int8_t>(i);
      pairs.second[k] = static_cast<int8_t>(j);
      pairs.sign[k] = sign;
      pairs.logit[k] = sign * (group.shifted[i] - group.shifted[j]) - margin;
      // x − y > 0 exactly when x > y (IEEE subtraction of distinct finite values is never 0).
      pairs.correct += sign * (group.reward[i] - group.reward[j]) > acc_t(0);
    }
  }
}

struct PromptStats {
  double term_sum = 0;
  int64_t pairs = 0;
  int64_t correct = 0;
};

// Σ over pairs of −log σ(x) = Σ max(−x, 0) + log Π (1 + e^−|x|): one exp per pair and one log per prompt
// (log1p per pair costs about twice an exp). Each factor lies in (1, 2] and a group has at most 120 pairs,
// so the double product stays below 2^120, and its rounding error (≤ 120 ulp) is far below float precision.
template <typename acc_t>
PromptStats prompt_forward(const Group<acc_t>& group, acc_t margin) {
  PairList<acc_t> pairs;
  list_pairs(group, margin, pairs);
  acc_t decay[kMaxPairs];
  for (int64_t k = 0; k < pairs.count; ++k) decay[k] = std::exp(-std::abs(pairs.logit[k]));
  // Two interleaved accumulators of each kind (named, so they stay in registers) halve the dependency chains.
  acc_t hinge_even = 0, hinge_odd = 0;
  double product_even = 1, product_odd = 1;
  const auto hinge = [](acc_t x) { return (std::abs(x) - x) / 2; };  // max(−x, 0), exact and branch-free
  int64_t k = 0;
  for (; k + 1 < pairs.count; k += 2) {
    hinge_even += hinge(pairs.logit[k]);
    hinge_odd += hinge(pairs.logit[k + 1]);
    product_even *= 1.0 + static_cast<double>(decay[k]);
    product_odd *= 1.0 + static_cast<double>(decay[k + 1]);
  }
  if (k < pairs.count) {
    hinge_even += hinge(pairs.logit[k]);
    product_even *= 1.0 + static_cast<double>(decay[k]);
  }
  const double hinge_sum = static_cast<double>(hinge_even) + static_cast<double>(hinge_odd);
  return {hinge_sum + std::log(product_even * product_odd), pairs.count, pairs.correct};
}

// d loss_p / d s for one group, unscaled: each pair pulls its better completion up and its worse one down
// by σ(−logit) (d/dlogit of −log σ(logit) = −σ(−logit)). The signed pulls go into an antisymmetric
// matrix (pull[i][j] = change of s_j's slope from pair (i, j)) whose column sums are the slopes: every
// entry is written once and the sums run over whole rows, so no update waits on the previous one.
template <typename acc_t>
void prompt_slopes(const Group<acc_t>& group, acc_t margin, acc_t* slope) {
  PairList<acc_t> pairs;
  list_pairs(group, margin, pairs);
  acc_t pull_on_second[kMaxPairs];  // +σ(−logit) when the second (j) is the worse one, −σ(−logit) otherwise
  for (int64_t k = 0; k < pairs.count; ++k) pull_on_second[k] = pairs.sign[k] * sigmoid_of_negative(pairs.logit[k]);
  acc_t pull[kMaxGroup][kMaxGroup] = {};
  for (int64_t k = 0; k < pairs.count; ++k) {
    pull[pairs.first[k]][pairs.second[k]] = pull_on_second[k];
    pull[pairs.second[k]][pairs.first[k]] = -pull_on_second[k];
  }
  for (int64_t i = 0; i < kMaxGroup; ++i) slope[i] = 0;
  for (int64_t row = 0; row < group.size; ++row) {
    for (int64_t i = 0; i < kMaxGroup; ++i) slope[i] += pull[row][i];
  }
}

template <typename scalar_t>
Inputs<scalar_t, at::opmath_type<scalar_t>> make_inputs(const at::Tensor& rewards, const at::Tensor& ranks,
                                                        const at::Tensor& margins, const at::Tensor& ends) {
  using acc_t = at::opmath_type<scalar_t>;
  return {rewards.data_ptr<scalar_t>(),
          rewards.stride(0),
          rewards.numel(),
          ranks.defined() ? ranks.data_ptr<int64_t>() : nullptr,
          margins.defined() ? margins.data_ptr<acc_t>() : nullptr,
          ends.data_ptr<int64_t>()};
}

at::Tensor contiguous_ranks(const std::optional<at::Tensor>& ranks) {
  return ranks ? ranks->to(at::kLong).contiguous() : at::Tensor();
}

at::Tensor contiguous_margins(const std::optional<at::Tensor>& margins, at::ScalarType dtype) {
  return margins ? margins->to(dtype).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ranking_loss_forward_cpu(
    const at::Tensor& rewards, const at::Tensor& group_sizes, const std::optional<at::Tensor>& ranks,
    const std::optional<at::Tensor>& margins, double margin) {
  rlhf_fast::check_ranking_forward_args(rewards, group_sizes, ranks, margins);
  const auto dtype = rlhf_fast::accumulate_dtype(rewards.scalar_type());
  const int64_t num_prompts = group_sizes.size(0);
  const auto ends = at::cumsum(group_sizes.to(at::kLong), 0).contiguous();
  const auto ranks_c = contiguous_ranks(ranks);
  const auto margins_c = contiguous_margins(margins, dtype);
  auto loss = at::empty({}, rewards.options().dtype(dtype));
  auto accuracy = at::empty({}, rewards.options().dtype(dtype));
  auto weights = at::empty({num_prompts}, rewards.options().dtype(dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "ranking_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto inputs = make_inputs<scalar_t>(rewards, ranks_c, margins_c, ends);
    std::vector<PromptStats> stats(num_prompts);
    at::parallel_for(0, num_prompts, grain_for(kNanosecondsPerPrompt), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) stats[p] = prompt_forward(inputs.load(p), static_cast<acc_t>(margin));
    });
    // Prompt order, in double: the result does not depend on the thread count.
    double mean_sum = 0;
    int64_t prompts_with_pairs = 0, pairs = 0, correct = 0;
    for (const auto& s : stats) {
      if (s.pairs > 0) {
        mean_sum += s.term_sum / static_cast<double>(s.pairs);
        ++prompts_with_pairs;
      }
      pairs += s.pairs;
      correct += s.correct;
    }
    loss.fill_(prompts_with_pairs ? mean_sum / static_cast<double>(prompts_with_pairs) : 0.0);
    accuracy.fill_(pairs ? static_cast<double>(correct) / static_cast<double>(pairs) : 0.0);
    auto* weight = weights.data_ptr<acc_t>();
    for (int64_t p = 0; p < num_prompts; ++p) {
      weight[p] = stats[p].pairs ? static_cast<acc_t>(
                                       1.0 / (static_cast<double>(stats[p].pairs) * static_cast<double>(prompts_with_pairs)))
                                 : acc_t(0);
    }
  });
  return {loss, accuracy, weights, ends};
}

at::Tensor ranking_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& rewards,
                                     const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& margins,
                                     double margin, const at::Tensor& prompt_weights, const at::Tensor& prompt_ends) {
  rlhf_fast::check_ranking_backward_args(grad_loss, rewards, ranks, margins, prompt_weights, prompt_ends);
  const auto dtype = rlhf_fast::accumulate_dtype(rewards.scalar_type());
  const int64_t num_prompts = prompt_ends.size(0);
  const auto ends = prompt_ends.to(at::kLong).contiguous();
  const auto weights = prompt_weights.to(dtype).contiguous();
  const auto ranks_c = contiguous_ranks(ranks);
  const auto margins_c = contiguous_margins(margins, dtype);
  const double grad = grad_loss.item<double>();
  // Zeros, so entries outside every group (only possible when the checks were skipped) stay defined.
  auto grad_rewards = at::zeros(rewards.sizes(), rewards.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "ranking_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto inputs = make_inputs<scalar_t>(rewards, ranks_c, margins_c, ends);
    const acc_t* weight = weights.data_ptr<acc_t>();
    scalar_t* out = grad_rewards.data_ptr<scalar_t>();
    const acc_t pair_margin = static_cast<acc_t>(margin);
    at::parallel_for(0, num_prompts, grain_for(kNanosecondsPerPrompt), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const auto group = inputs.load(p);
        const acc_t scale = static_cast<acc_t>(grad) * weight[p];
        acc_t slope[kMaxGroup];
        prompt_slopes(group, pair_margin, slope);
        for (int64_t i = 0; i < group.size; ++i) out[group.start + i] = static_cast<scalar_t>(scale * slope[i]);
      }
    });
  });
  return grad_rewards;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("ranking_loss_forward", &ranking_loss_forward_cpu);
  m.impl("ranking_loss_backward", &ranking_loss_backward_cpu);
}
