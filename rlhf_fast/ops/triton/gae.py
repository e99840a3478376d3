"""GAE in Triton: one program per row, a reverse scan of affine maps, whitening in a second small kernel.

Walking a row backwards, a valid token t maps the carried state (next value v, next advantage a) to
(V_t, r_t − V_t + γ·v + γλ·a); a masked token leaves it unchanged. A run of tokens therefore maps the state as
(v, a) → (value, p·v + q·a + k) when it holds a valid token (`value` = V at its earliest valid token) and is
the identity otherwise. These maps compose associatively (`_then_earlier`), so each program loads its row
back to front and runs one `tl.associative_scan`: the inclusive composite at a valid token, applied to the
state carried in from the later chunks, is that token's advantage. Rows longer than BLOCK are processed in
chunks from the end, carrying the state.

With whitening, the row kernel also writes each row's (count, sum, sum of squares) in float64; torch sums
those [B, 3] partials and `_whiten_kernel` normalizes the valid advantages in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.ops._contract import WHITEN_EPS, output_dtype

MAX_BLOCK = 1024
SHORT_ROW_BLOCK = 128


def _block_for(steps: int, device: torch.device) -> int:
    """Tokens per scan. On a GPU two sizes only (each is a compile); the interpreter's cost grows with it."""
    if device.type == "cuda":
        return SHORT_ROW_BLOCK if steps <= SHORT_ROW_BLOCK else MAX_BLOCK
    return min(triton.next_power_of_2(steps), MAX_BLOCK)


@triton.jit
def _then_earlier(
    has_later,
    value_later,
    p_later,
    q_later,
    k_later,
    has_earlier,
    value_earlier,
    p_earlier,
    q_earlier,
    k_earlier,
):
    # `later` covers later time steps and is applied first; `earlier` covers the tokens before them.
    earlier_valid = has_earlier != 0
    both = (has_later != 0) & earlier_valid
    has = has_later | has_earlier
    value = tl.where(earlier_valid, value_earlier, value_later)
    p = tl.where(both, q_earlier * p_later, tl.where(earlier_valid, p_earlier, p_later))
    q = tl.where(both, q_earlier * q_later, tl.where(earlier_valid, q_earlier, q_later))
    k = tl.where(
        both,
        p_earlier * value_later + q_earlier * k_later + k_earlier,
        tl.where(earlier_valid, k_earlier, k_later),
    )
    return has, value, p, q, k


@triton.jit
def _last_lane(x, is_last):
    return tl.sum(tl.where(is_last, x, 0), axis=0)


@triton.jit(do_not_specialize=["steps"])  # one compiled variant for every row length
def _gae_rows_kernel(
    rewards_ptr,
    values_ptr,
    mask_ptr,
    advantages_ptr,
    returns_ptr,
    partials_ptr,
    steps,
    stride_rewards_row,
    stride_rewards_step,
    stride_values_row,
    stride_values_step,
    stride_mask_row,
    stride_mask_step,
    gamma_hi,
    gamma_lo,
    decay_hi,
    decay_lo,
    ACC: tl.constexpr,
    WHITEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Triton passes Python floats as float32; hi + lo halves keep γ and γλ exact enough for float64 rows.
    gamma = (tl.zeros((), dtype=ACC) + gamma_hi) + gamma_lo
    decay = (tl.zeros((), dtype=ACC) + decay_hi) + decay_lo
    lanes = tl.arange(0, BLOCK)
    is_last = lanes == BLOCK - 1
    next_value = tl.zeros((), dtype=ACC)
    next_advantage = tl.zeros((), dtype=ACC)
    count = tl.zeros((), dtype=tl.float64)
    total = tl.zeros((), dtype=tl.float64)
    total_sq = tl.zeros((), dtype=tl.float64)
    # A while loop, not range(0, steps, BLOCK): the interpreter cannot take a runtime bound in range()
    # under numpy >= 2.4.
    start = 0
    while start < steps:
        # Lane j holds time step steps − 1 − j: the forward scan runs backwards in time.
        j = start + lanes
        inside = j < steps
        t = (steps - 1 - j).to(tl.int64)
        valid = tl.load(mask_ptr + row * stride_mask_row + t * stride_mask_step, mask=inside, other=0) != 0
        reward = tl.load(
            rewards_ptr + row * stride_rewards_row + t * stride_rewards_step, mask=valid, other=0
        ).to(ACC)
        value = tl.load(
            values_ptr + row * stride_values_row + t * stride_values_step, mask=valid, other=0
        ).to(ACC)
        has = valid.to(tl.int32)
        p = tl.where(valid, gamma, 0.0).to(ACC)
        q = tl.where(valid, decay, 1.0).to(ACC)
        k = reward - value
        has_s, value_s, p_s, q_s, k_s = tl.associative_scan((has, value, p, q, k), 0, _then_earlier)
        advantage = tl.where(valid, p_s * next_value + q_s * next_advantage + k_s, 0.0)
        out = row * steps + t
        tl.store(advantages_ptr + out, advantage, mask=inside)
        tl.store(returns_ptr + out, tl.where(valid, advantage + value, 0.0), mask=inside)
        if WHITEN:
            wide = advantage.to(tl.float64)
            count += tl.sum(valid.to(tl.float64), axis=0)
            total += tl.sum(wide, axis=0)
            total_sq += tl.sum(wide * wide, axis=0)
        # The last lane's inclusive composite is the whole chunk's map: carry the state through it.
        chunk_has = _last_lane(has_s, is_last) != 0
        carried_advantage = (
            _last_lane(p_s, is_last) * next_value
            + _last_lane(q_s, is_last) * next_advantage
            + _last_lane(k_s, is_last)
        )
        next_advantage = tl.where(chunk_has, carried_advantage, next_advantage)
        next_value = tl.where(chunk_has, _last_lane(value_s, is_last), next_value)
        start += BLOCK
    if WHITEN:
        tl.store(partials_ptr + row * 3 + 0, count)
        tl.store(partials_ptr + row * 3 + 1, total)
        tl.store(partials_ptr + row * 3 + 2, total_sq)


@triton.jit(do_not_specialize=["steps"])
def _whiten_kernel(
    advantages_ptr,
    mask_ptr,
    totals_ptr,
    steps,
    stride_mask_row,
    stride_mask_step,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    count = tl.load(totals_ptr + 0)
    total = tl.load(totals_ptr + 1)
    total_sq = tl.load(totals_ptr + 2)
    mean = total / tl.maximum(count, 1.0)
    var = tl.where(count > 1, tl.maximum((total_sq - total * mean) / tl.maximum(count - 1, 1.0), 0.0), 0.0)
    inv_std = 1.0 / tl.sqrt(var + eps)
    t = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = t < steps
    valid = tl.load(mask_ptr + row * stride_mask_row + t * stride_mask_step, mask=inside, other=0) != 0
    slot = advantages_ptr + row * steps + t
    advantage = tl.load(slot, mask=valid, other=0.0)
    whitened = (advantage.to(tl.float64) - mean) * inv_std
    tl.store(slot, whitened.to(advantage.dtype), mask=valid)


def _split(x: float) -> tuple[float, float]:
    """x as a float32 pair (hi, lo) with hi + lo ≈ x to about 48 bits."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def gae_triton(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten: bool,
    whiten_eps: float = WHITEN_EPS,
    *,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, each [B, T] float32 (float64 for float64 rewards).

    rewards, values: [B, T] float32/bfloat16/float16/float64, any strides; mask: [B, T] bool or integer,
    nonzero = valid. `block_size` (a power of two) caps the tokens one scan covers; longer rows are chunked.
    Arguments are assumed checked by `rlhf_fast.ops.gae.gae`.
    """
    batch, steps = rewards.shape
    out_dtype = output_dtype(rewards.dtype)
    advantages = torch.empty((batch, steps), dtype=out_dtype, device=rewards.device)
    returns = torch.empty((batch, steps), dtype=out_dtype, device=rewards.device)
    if batch == 0 or steps == 0:
        return advantages, returns
    block = block_size or _block_for(steps, rewards.device)
    acc = tl.float64 if out_dtype == torch.float64 else tl.float32
    partials = torch.empty((batch, 3), dtype=torch.float64, device=rewards.device) if whiten else advantages
    gamma_hi, gamma_lo = _split(gamma)
    decay_hi, decay_lo = _split(gamma * lam)
    _gae_rows_kernel[(batch,)](
        rewards,
        values,
        mask,
        advantages,
        returns,
        partials,
        steps,
        rewards.stride(0),
        rewards.stride(1),
        values.stride(0),
        values.stride(1),
        mask.stride(0),
        mask.stride(1),
        gamma_hi,
        gamma_lo,
        decay_hi,
        decay_lo,
        ACC=acc,
        WHITEN=whiten,
        BLOCK=block,
        num_warps=4 if block <= 512 else 8,
    )
    if whiten:
        totals = partials.sum(dim=0)
        whiten_block = _block_for(steps, rewards.device)
        _whiten_kernel[(batch, triton.cdiv(steps, whiten_block))](
            advantages,
            mask,
            totals,
            steps,
            mask.stride(0),
            mask.stride(1),
            whiten_eps,
            BLOCK=whiten_block,
            num_warps=4,
        )
    return advantages, returns
