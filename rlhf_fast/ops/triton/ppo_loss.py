"""Triton kernels for the PPO losses (see rlhf_fast/ops/ppo_loss.py for the math and its tie rules).

Forward, two launches: each program of `_tokens_kernel` reduces one block of tokens to partial sums (losses,
KL, ratio) and counts (valid, clipped, value-clipped); one program then adds the partials in a fixed order,
in float64, and writes the 0-dim means. No atomics, so the result is the same on every run.
Backward, one launch of `_tokens_kernel` (BACKWARD=True): elementwise, recomputing the ratio; the means'
1/count comes from the forward's count.

Tokens are addressed as (index // T, index % T) with each tensor's two strides, so views such as
`logprobs[:, prompt_len:]` run without a copy. Clip bounds travel as the bit patterns of float64 numbers,
because Triton passes Python floats as float32 and the float64 path must clip at exactly 1 ± clip_coef.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from rlhf_fast.ops._backend import triton_interpreting

BLOCK_GPU = 1024
BLOCK_INTERPRETER = 4096  # the interpreter pays per program, not per element: fewer, larger blocks
NUM_SUMS = 4  # policy_loss, approx_kl, ratio, value_loss
NUM_COUNTS = 3  # valid, clipped, value_clipped


@triton.jit
def _to_acc(x, IS_FP64: tl.constexpr):
    if IS_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _from_bits(bits, IS_FP64: tl.constexpr):
    """A float64 passed as its int64 bit pattern, in the accumulation dtype."""
    return _to_acc(bits.to(tl.int64).to(tl.float64, bitcast=True), IS_FP64)


@triton.jit
def _policy_token(logprob, old_logprob, advantage, ratio_low, ratio_high):
    """(loss, ratio, approx_kl, clipped, d loss / d logprob) per token; see csrc/kernels/ppo_loss_token.h."""
    log_ratio = logprob - old_logprob
    ratio = tl.exp(log_ratio)
    unclipped = -advantage * ratio
    clipped_loss = -advantage * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
    clipped = clipped_loss > unclipped
    loss = tl.where(clipped, clipped_loss, unclipped)
    grad = tl.where(clipped, 0.0, unclipped)
    return loss, ratio, (ratio - 1.0) - log_ratio, clipped, grad


@triton.jit
def _value_token(value, old_value, target, value_clip):
    """(½·max of the squared errors, clipped, d loss / d value) per token."""
    clipped_value = tl.minimum(tl.maximum(value, old_value - value_clip), old_value + value_clip)
    error = value - target
    clipped_error = clipped_value - target
    unclipped_loss = error * error
    clipped_loss = clipped_error * clipped_error
    clipped = clipped_loss > unclipped_loss
    return 0.5 * tl.where(clipped, clipped_loss, unclipped_loss), clipped, tl.where(clipped, 0.0, error)


@triton.jit
def _load(ptr, rows, cols, stride0, stride1, valid, IS_FP64: tl.constexpr):
    return _to_acc(tl.load(ptr + rows * stride0 + cols * stride1, mask=valid, other=0.0), IS_FP64)


@triton.jit
def _store_gradient(OUT, index, in_range, valid, grad, GRAD_LOSS, VALID_COUNT, IS_FP64: tl.constexpr):
    """The backward's per-token gradient into OUT: grad · (d loss / d mean) / count where valid, else 0."""
    # d mean / d token = 1 / count; an all-masked batch has no token to receive it.
    inverse_count = 1.0 / tl.maximum(tl.load(VALID_COUNT), 1).to(tl.float64)
    scale = _to_acc(tl.load(GRAD_LOSS).to(tl.float64) * inverse_count, IS_FP64)
    grad = tl.where(valid, grad * scale, 0.0)
    tl.store(OUT + index, grad.to(OUT.dtype.element_ty), mask=in_range)


@triton.jit
def _tokens_kernel(
    LOGPROBS,
    OLD_LOGPROBS,
    ADVANTAGES,
    MASK,
    VALUES,
    OLD_VALUES,
    RETURNS,
    OUT_POLICY,
    OUT_VALUE,
    GRAD_POLICY_LOSS,
    GRAD_VALUE_LOSS,
    VALID_COUNT,
    numel,
    steps,
    lp_stride0,
    lp_stride1,
    olp_stride0,
    olp_stride1,
    adv_stride0,
    adv_stride1,
    mask_stride0,
    mask_stride1,
    v_stride0,
    v_stride1,
    ov_stride0,
    ov_stride1,
    ret_stride0,
    ret_stride1,
    ratio_low_bits,
    ratio_high_bits,
    value_clip_bits,
    HAS_VALUES: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """One block of tokens. Forward: partial sums into OUT_POLICY (SUMS) and counts into OUT_VALUE (COUNTS).
    Backward: d loss / d logprob into OUT_POLICY and d loss / d value into OUT_VALUE, given the losses'
    gradients and the forward's count (GRAD_*, VALID_COUNT: placeholders in the forward)."""
    program = tl.program_id(0).to(tl.int64)
    num_programs = tl.num_programs(0)
    index = program * BLOCK + tl.arange(0, BLOCK)
    in_range = index < numel
    rows, cols = index // steps, index % steps
    valid = in_range & (
        tl.load(MASK + rows * mask_stride0 + cols * mask_stride1, mask=in_range, other=0) != 0
    )

    logprob = _load(LOGPROBS, rows, cols, lp_stride0, lp_stride1, valid, IS_FP64)
    old_logprob = _load(OLD_LOGPROBS, rows, cols, olp_stride0, olp_stride1, valid, IS_FP64)
    advantage = _load(ADVANTAGES, rows, cols, adv_stride0, adv_stride1, valid, IS_FP64)
    ratio_low, ratio_high = _from_bits(ratio_low_bits, IS_FP64), _from_bits(ratio_high_bits, IS_FP64)
    loss, ratio, approx_kl, clipped, grad_logprob = _policy_token(
        logprob, old_logprob, advantage, ratio_low, ratio_high
    )
    if BACKWARD:
        _store_gradient(
            OUT_POLICY, index, in_range, valid, grad_logprob, GRAD_POLICY_LOSS, VALID_COUNT, IS_FP64
        )
    else:
        tl.store(OUT_POLICY + 0 * num_programs + program, tl.sum(tl.where(valid, loss, 0.0), 0))
        tl.store(OUT_POLICY + 1 * num_programs + program, tl.sum(tl.where(valid, approx_kl, 0.0), 0))
        tl.store(OUT_POLICY + 2 * num_programs + program, tl.sum(tl.where(valid, ratio, 0.0), 0))
        tl.store(OUT_VALUE + 0 * num_programs + program, tl.sum(valid.to(tl.int32), 0))
        tl.store(OUT_VALUE + 1 * num_programs + program, tl.sum((valid & clipped).to(tl.int32), 0))
    if HAS_VALUES:
        value = _load(VALUES, rows, cols, v_stride0, v_stride1, valid, IS_FP64)
        old_value = _load(OLD_VALUES, rows, cols, ov_stride0, ov_stride1, valid, IS_FP64)
        target = _load(RETURNS, rows, cols, ret_stride0, ret_stride1, valid, IS_FP64)
        value_loss, value_clipped, grad_value = _value_token(
            value, old_value, target, _from_bits(value_clip_bits, IS_FP64)
        )
        if BACKWARD:
            _store_gradient(
                OUT_VALUE, index, in_range, valid, grad_value, GRAD_VALUE_LOSS, VALID_COUNT, IS_FP64
            )
        else:
            tl.store(OUT_POLICY + 3 * num_programs + program, tl.sum(tl.where(valid, value_loss, 0.0), 0))
            tl.store(OUT_VALUE + 2 * num_programs + program, tl.sum((valid & value_clipped).to(tl.int32), 0))
    else:
        if not BACKWARD:
            tl.store(OUT_POLICY + 3 * num_programs + program, 0.0)
            tl.store(OUT_VALUE + 2 * num_programs + program, 0)


@triton.jit
def _finalize_kernel(
    SUMS,
    COUNTS,
    num_partials,
    POLICY_LOSS,
    CLIPFRAC,
    APPROX_KL,
    RATIO_MEAN,
    VALUE_LOSS,
    VALUE_CLIPFRAC,
    VALID_COUNT,
    REDUCE_BLOCK: tl.constexpr,
):
    # One tile holds every partial (REDUCE_BLOCK is the next power of two), so there is no loop to order.
    index = tl.arange(0, REDUCE_BLOCK)
    present = index < num_partials
    policy_loss = tl.load(SUMS + 0 * num_partials + index, mask=present, other=0.0).to(tl.float64)
    approx_kl = tl.load(SUMS + 1 * num_partials + index, mask=present, other=0.0).to(tl.float64)
    ratio = tl.load(SUMS + 2 * num_partials + index, mask=present, other=0.0).to(tl.float64)
    value_loss = tl.load(SUMS + 3 * num_partials + index, mask=present, other=0.0).to(tl.float64)
    valid = tl.load(COUNTS + 0 * num_partials + index, mask=present, other=0).to(tl.int64)
    clipped = tl.load(COUNTS + 1 * num_partials + index, mask=present, other=0).to(tl.int64)
    value_clipped = tl.load(COUNTS + 2 * num_partials + index, mask=present, other=0).to(tl.int64)
    count = tl.sum(valid, 0)
    # An all-masked batch divides zeros by 1: every output is 0, never NaN.
    inverse_count = 1.0 / tl.maximum(count, 1).to(tl.float64)
    out_dtype = POLICY_LOSS.dtype.element_ty
    tl.store(POLICY_LOSS, (tl.sum(policy_loss, 0) * inverse_count).to(out_dtype))
    tl.store(CLIPFRAC, (tl.sum(clipped, 0).to(tl.float64) * inverse_count).to(out_dtype))
    tl.store(APPROX_KL, (tl.sum(approx_kl, 0) * inverse_count).to(out_dtype))
    tl.store(RATIO_MEAN, (tl.sum(ratio, 0) * inverse_count).to(out_dtype))
    tl.store(VALUE_LOSS, (tl.sum(value_loss, 0) * inverse_count).to(out_dtype))
    tl.store(VALUE_CLIPFRAC, (tl.sum(value_clipped, 0).to(tl.float64) * inverse_count).to(out_dtype))
    tl.store(VALID_COUNT, count)


def _float64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _block_size(block_size: int | None) -> int:
    if block_size is not None:
        return block_size
    return BLOCK_INTERPRETER if triton_interpreting() else BLOCK_GPU


def _launch_arguments(
    logprobs, old_logprobs, advantages, mask, values, old_values, returns, clip_coef, value_clip
):
    """The pointer, stride and bound arguments both kernels share (value tensors stand in for themselves)."""
    mask = mask if mask.dtype == torch.bool else mask != 0
    has_values = values is not None
    value_tensors = (values, old_values, returns) if has_values else (logprobs,) * 3
    tensors = (logprobs, old_logprobs, advantages, mask.view(torch.uint8), *value_tensors)
    strides = [stride for tensor in tensors for stride in tensor.stride()]
    bounds = (_float64_bits(1.0 - clip_coef), _float64_bits(1.0 + clip_coef), _float64_bits(value_clip))
    steps = max(logprobs.shape[1], 1)  # a [B, 0] batch has no token to address; avoid dividing by 0
    return tensors, (logprobs.numel(), steps, *strides, *bounds), has_values


def ppo_losses_forward_triton(logprobs, *rest, block_size: int | None = None):
    """The forward op's 7 outputs (see FORWARD_OUTPUTS in rlhf_fast/ops/ppo_loss.py) from its arguments."""
    tensors, scalars, has_values = _launch_arguments(logprobs, *rest)
    is_fp64 = logprobs.dtype == torch.float64
    acc_dtype = torch.float64 if is_fp64 else torch.float32
    block = _block_size(block_size)
    num_partials = max(triton.cdiv(logprobs.numel(), block), 1)
    sums = torch.empty(NUM_SUMS * num_partials, dtype=acc_dtype, device=logprobs.device)
    counts = torch.empty(NUM_COUNTS * num_partials, dtype=torch.int32, device=logprobs.device)
    placeholders = (sums,) * 3  # the backward's inputs, never read
    _tokens_kernel[(num_partials,)](
        *tensors,
        sums,
        counts,
        *placeholders,
        *scalars,
        HAS_VALUES=has_values,
        IS_FP64=is_fp64,
        BLOCK=block,
        BACKWARD=False,
    )
    means = [torch.empty((), dtype=acc_dtype, device=logprobs.device) for _ in range(6)]
    valid_count = torch.empty((), dtype=torch.int64, device=logprobs.device)
    reduce_block = max(triton.next_power_of_2(num_partials), 32)  # at least one warp's width
    # Enough threads that the 7 columns of partials stay in registers.
    _finalize_kernel[(1,)](
        sums,
        counts,
        num_partials,
        *means,
        valid_count,
        REDUCE_BLOCK=reduce_block,
        num_warps=min(max(reduce_block // 256, 4), 16),
    )
    return (*means, valid_count)


def ppo_losses_backward_triton(
    grad_policy_loss, grad_value_loss, logprobs, *rest, block_size: int | None = None
):
    """(grad_logprobs, grad_values), contiguous, in the inputs' dtype; grad_values is empty without values.

    The arguments are those of the rlhf_fast::ppo_losses_backward op."""
    old_logprobs, advantages, mask, values, old_values, returns, valid_count, clip_coef, value_clip = rest
    tensors, scalars, has_values = _launch_arguments(
        logprobs, old_logprobs, advantages, mask, values, old_values, returns, clip_coef, value_clip
    )
    grad_logprobs = torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
    grad_values = torch.empty_like(grad_logprobs) if has_values else logprobs.new_empty(0)
    block = _block_size(block_size)
    grid = (max(triton.cdiv(logprobs.numel(), block), 1),)
    outputs = (grad_logprobs, grad_values if has_values else grad_logprobs)
    _tokens_kernel[grid](
        *tensors,
        *outputs,
        grad_policy_loss,
        grad_value_loss,
        valid_count,
        *scalars,
        HAS_VALUES=has_values,
        IS_FP64=logprobs.dtype == torch.float64,
        BLOCK=block,
        BACKWARD=True,
    )
    return grad_logprobs, grad_values
