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
def _ranking_kernel(
    rewards_ptr,
    rewards_stride,
    ranks_ptr,
    margins_ptr,
    ends_ptr,
    num_completions,
    margin_hi,
    margin_lo,
    grad_loss_ptr,
    weights_ptr,
    out_ptr,
    pair_counts_ptr,
    correct_counts_ptr,
    HAS_RANKS: tl.constexpr,
    HAS_MARGINS: tl.constexpr,
    ACC_FP64: tl.constexpr,
    K_BLOCK: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Forward: per-prompt Σ −log σ (out), #pairs and #correct. Backward: the group's d loss / d rewards (out)
    from d loss and the prompt's weight."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    prompt = tl.program_id(0).to(tl.int64)
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
    margin = tl.cast(margin_hi, acc_dtype) + tl.cast(margin_lo, acc_dtype)
    above = valid[:, None] & valid[None, :] & (rank[:, None] < rank[None, :])  # row i ranked above column j
    logit = shifted[:, None] - shifted[None, :] - margin
    if BACKWARD:
        # d/dlogit of −log σ(logit) = −σ(−logit); the logit of pair (i, j) moves with +r_i and −r_j.
        slope = tl.where(above, -tl.sigmoid(-logit), 0.0)
        per_completion = tl.sum(slope, axis=1) - tl.sum(slope, axis=0)
        scale = tl.load(grad_loss_ptr).to(acc_dtype) * tl.load(weights_ptr + prompt).to(acc_dtype)
        grad = per_completion * scale
        tl.store(out_ptr + index, grad.to(out_ptr.dtype.element_ty), mask=valid)
    else:
        # −log σ(x) = max(−x, 0) + log(1 + e^−|x|): no overflow for either sign.
        term = tl.maximum(-logit, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(logit)))
        term = tl.where(above, term, 0.0)
        correct = above & (reward[:, None] > reward[None, :])
        tl.store(out_ptr + prompt, tl.sum(tl.sum(term, axis=1), axis=0))
        tl.store(pair_counts_ptr + prompt, tl.sum(tl.sum(above.to(tl.int32), axis=1), axis=0))
        tl.store(correct_counts_ptr + prompt, tl.sum(tl.sum(correct.to(tl.int32), axis=1), axis=0))


def _split_float(value: float) -> tuple[float, float]:
    """value = hi + lo with both representable in float32: Triton passes Python floats as float32."""
    hi = float(numpy.float32(value))
    return hi, float(numpy.float32(value - hi))


def _launch(rewards, ranks, margins, ends, margin, *outputs, backward: bool) -> None:
    """One program per prompt; `outputs`: (grad_loss, weights, grad, -, -) backward, (-, -, term sums, pair
    counts, correct counts) forward, with `rewards` as a never-read placeholder for any absent tensor."""
    has_ranks, has_margins = ranks is not None, margins is not None
    _ranking_kernel[(ends.shape[0],)](
        rewards,
        rewards.stride(0),
        ranks.contiguous() if has_ranks else rewards,
        margins.contiguous() if has_margins else rewards,
        ends,
        rewards.numel(),
        *_split_float(margin),
        *(rewards if tensor is None else tensor for tensor in outputs),
        HAS_RANKS=has_ranks,
        HAS_MARGINS=has_margins,
        ACC_FP64=rewards.dtype == torch.float64,
        K_BLOCK=K_BLOCK,
        BACKWARD=backward,
    )


def ranking_forward_triton(
    rewards, group_sizes, ranks, margins, margin
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, accuracy, prompt_weights [P], prompt_ends [P] int64), as the rlhf_fast::ranking_loss_forward op
    (whose signature declares the arguments' types)."""
    dtype = output_dtype(rewards.dtype)
    num_prompts = group_sizes.shape[0]
    ends = torch.cumsum(group_sizes, 0, dtype=torch.int64)
    term_sums = torch.empty(num_prompts, dtype=dtype, device=rewards.device)
    pair_counts = torch.empty(num_prompts, dtype=torch.int32, device=rewards.device)
    correct_counts = torch.empty(num_prompts, dtype=torch.int32, device=rewards.device)
    stats = (term_sums, pair_counts, correct_counts)
    _launch(rewards, ranks, margins, ends, margin, None, None, *stats, backward=False)
    loss, accuracy, weights = ranking_outputs_from_prompt_stats(term_sums, pair_counts, correct_counts, dtype)
    return loss, accuracy, weights, ends


def ranking_backward_triton(
    grad_loss, rewards, ranks, margins, margin, prompt_weights, prompt_ends
) -> torch.Tensor:
    """d loss / d rewards, [ΣK] in the dtype of rewards, as the rlhf_fast::ranking_loss_backward op."""
    # Zeros, so entries outside every group (only possible when the checks were skipped) stay defined.
    grad = torch.zeros(rewards.shape, dtype=rewards.dtype, device=rewards.device)
    ends = prompt_ends.to(torch.int64).contiguous()
    outputs = (grad_loss.reshape(()), prompt_weights.contiguous(), grad, None, None)
    _launch(rewards, ranks, margins, ends, margin, *outputs, backward=True)
    return grad
