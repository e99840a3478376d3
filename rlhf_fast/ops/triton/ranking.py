"""Triton kernels for the K-wise ranking loss (definition in rlhf_fast/ops/ranking.py).

One program per prompt holds its group in a K_BLOCK = 16 tile and the pair logits in a 16 x 16 tile of
registers. The forward writes per-prompt (Σ −log σ, #pairs, #correct) and a few torch ops reduce them over
prompts; the backward reads each prompt's weight from the forward and writes the group's gradient.
"""

from __future__ import annotations

import numpy
import torch
import triton
import triton.language as tl

from rlhf_fast.ops._contract import MAX_GROUP, output_dtype, ranking_outputs_from_prompt_stats

K_BLOCK = MAX_GROUP


@triton.jit
def _load_group(
    rewards_ptr,
    rewards_stride,
    ranks_ptr,
    margins_ptr,
    ends_ptr,
    prompt,
    num_completions,
    HAS_RANKS: tl.constexpr,
    HAS_MARGINS: tl.constexpr,
    ACC_FP64: tl.constexpr,
    K_BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    end = tl.load(ends_ptr + prompt)
    start = tl.load(ends_ptr + prompt - 1, mask=prompt > 0, other=0)
    position = tl.arange(0, K_BLOCK)
    index = start + position
    # Clamped to the rewards' length, so inputs that skipped the Python checks cannot read out of bounds.
    valid = (index < end) & (index >= 0) & (index < num_completions)
    reward = tl.load(rewards_ptr + index * rewards_stride, mask=valid, other=0.0).to(acc_dtype)
    if HAS_MARGINS:
        shifted = reward - tl.load(margins_ptr + index, mask=valid, other=0.0).to(acc_dtype)
    else:
        shifted = reward
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + index, mask=valid, other=0).to(tl.int64)
    else:
        rank = position.to(tl.int64)
    return index, valid, reward, shifted, rank


@triton.jit
def _ranking_forward_kernel(
    rewards_ptr,
    rewards_stride,
    ranks_ptr,
    margins_ptr,
    ends_ptr,
    term_sums_ptr,
    pair_counts_ptr,
    correct_counts_ptr,
    num_completions,
    margin_hi,
    margin_lo,
    HAS_RANKS: tl.constexpr,
    HAS_MARGINS: tl.constexpr,
    ACC_FP64: tl.constexpr,
    K_BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    prompt = tl.program_id(0).to(tl.int64)
    _, valid, reward, shifted, rank = _load_group(
        rewards_ptr,
        rewards_stride,
        ranks_ptr,
        margins_ptr,
        ends_ptr,
        prompt,
        num_completions,
        HAS_RANKS,
        HAS_MARGINS,
        ACC_FP64,
        K_BLOCK,
    )
    margin = tl.cast(margin_hi, acc_dtype) + tl.cast(margin_lo, acc_dtype)
    above = valid[:, None] & valid[None, :] & (rank[:, None] < rank[None, :])  # row i ranked above column j
    logit = shifted[:, None] - shifted[None, :] - margin
    # −log σ(x) = max(−x, 0) + log(1 + e^−|x|): no overflow for either sign.
    term = tl.maximum(-logit, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(logit)))
    term = tl.where(above, term, 0.0)
    correct = above & (reward[:, None] > reward[None, :])
    tl.store(term_sums_ptr + prompt, tl.sum(tl.sum(term, axis=1), axis=0))
    tl.store(pair_counts_ptr + prompt, tl.sum(tl.sum(above.to(tl.int32), axis=1), axis=0))
    tl.store(correct_counts_ptr + prompt, tl.sum(tl.sum(correct.to(tl.int32), axis=1), axis=0))


@triton.jit
def _ranking_backward_kernel(
    grad_loss_ptr,
    rewards_ptr,
    rewards_stride,
    ranks_ptr,
    margins_ptr,
    ends_ptr,
    weights_ptr,
    grad_ptr,
    num_completions,
    margin_hi,
    margin_lo,
    HAS_RANKS: tl.constexpr,
    HAS_MARGINS: tl.constexpr,
    ACC_FP64: tl.constexpr,
    K_BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    prompt = tl.program_id(0).to(tl.int64)
    index, valid, _, shifted, rank = _load_group(
        rewards_ptr,
        rewards_stride,
        ranks_ptr,
        margins_ptr,
        ends_ptr,
        prompt,
        num_completions,
        HAS_RANKS,
        HAS_MARGINS,
        ACC_FP64,
        K_BLOCK,
    )
    margin = tl.cast(margin_hi, acc_dtype) + tl.cast(margin_lo, acc_dtype)
    above = valid[:, None] & valid[None, :] & (rank[:, None] < rank[None, :])
    logit = shifted[:, None] - shifted[None, :] - margin
    # d/dlogit of −log σ(logit) = −σ(−logit); the logit of pair (i, j) moves with +r_i and −r_j.
    slope = tl.where(above, -tl.sigmoid(-logit), 0.0)
    per_completion = tl.sum(slope, axis=1) - tl.sum(slope, axis=0)
    scale = tl.load(grad_loss_ptr).to(acc_dtype) * tl.load(weights_ptr + prompt).to(acc_dtype)
    grad = per_completion * scale
    tl.store(grad_ptr + index, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def _split_float(value: float) -> tuple[float, float]:
    """value = hi + lo with both representable in float32: Triton passes Python floats as float32."""
    hi = float(numpy.float32(value))
    return hi, float(numpy.float32(value - hi))


def _common_args(rewards, ranks, margins):
    has_ranks, has_margins = ranks is not None, margins is not None
    flags = {
        "HAS_RANKS": has_ranks,
        "HAS_MARGINS": has_margins,
        "ACC_FP64": rewards.dtype == torch.float64,
        "K_BLOCK": K_BLOCK,
    }
    # Absent tensors are replaced by `rewards` as a never-read placeholder pointer.
    return (
        (ranks.contiguous() if has_ranks else rewards),
        (margins.contiguous() if has_margins else rewards),
        flags,
    )


def ranking_forward_triton(
    rewards: torch.Tensor,
    group_sizes: torch.Tensor,
    ranks: torch.Tensor | None,
    margins: torch.Tensor | None,
    margin: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, accuracy, prompt_weights [P], prompt_ends [P] int64), as the rlhf_fast::ranking_loss_forward op."""
    dtype = output_dtype(rewards.dtype)
    num_prompts = group_sizes.shape[0]
    ends = torch.cumsum(group_sizes, 0, dtype=torch.int64)
    term_sums = torch.empty(num_prompts, dtype=dtype, device=rewards.device)
    pair_counts = torch.empty(num_prompts, dtype=torch.int32, device=rewards.device)
    correct_counts = torch.empty(num_prompts, dtype=torch.int32, device=rewards.device)
    ranks_arg, margins_arg, flags = _common_args(rewards, ranks, margins)
    margin_hi, margin_lo = _split_float(margin)
    _ranking_forward_kernel[(num_prompts,)](
        rewards,
        rewards.stride(0),
        ranks_arg,
        margins_arg,
        ends,
        term_sums,
        pair_counts,
        correct_counts,
        rewards.numel(),
        margin_hi,
        margin_lo,
        **flags,
    )
    loss, accuracy, weights = ranking_outputs_from_prompt_stats(term_sums, pair_counts, correct_counts, dtype)
    return loss, accuracy, weights, ends


def ranking_backward_triton(
    grad_loss: torch.Tensor,
    rewards: torch.Tensor,
    ranks: torch.Tensor | None,
    margins: torch.Tensor | None,
    margin: float,
    prompt_weights: torch.Tensor,
    prompt_ends: torch.Tensor,
) -> torch.Tensor:
    """d loss / d rewards, [ΣK] in the dtype of rewards, as the rlhf_fast::ranking_loss_backward op."""
    # Zeros, so entries outside every group (only possible when the checks were skipped) stay defined.
    grad = torch.zeros(rewards.shape, dtype=rewards.dtype, device=rewards.device)
    ranks_arg, margins_arg, flags = _common_args(rewards, ranks, margins)
    margin_hi, margin_lo = _split_float(margin)
    _ranking_backward_kernel[(prompt_ends.shape[0],)](
        grad_loss.reshape(()),
        rewards,
        rewards.stride(0),
        ranks_arg,
        margins_arg,
        prompt_ends.to(torch.int64).contiguous(),
        prompt_weights.contiguous(),
        grad,
        rewards.numel(),
        margin_hi,
        margin_lo,
        **flags,
    )
    return grad
