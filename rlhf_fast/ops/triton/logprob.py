"""Triton kernels for per-token log-prob / entropy / KL from logits (see rlhf_fast/ops/logprob/).

Forward: one program per row streams the vocabulary once in blocks, keeping a running max m, the rescaled
sum-exp s0 = Σ e^{z−m} and (for entropy) s1 = Σ e^{z−m}·(z−m); then lse = m + log s0, H = log s0 − s1/s0,
log p_y = z_y − lse, and the KL term against the reference log-prob. Only lse is saved for backward besides the
outputs themselves.

Backward: one program per row recomputes p = exp(z − lse) block by block and writes, for z = logits / τ,

    dL/dz_k = a·(1[k = y] − p_k) − b·p_k·(log p_k + H),    a = dL/dlogp + dL/dKL · dKL/dlogp,  b = dL/dH

times 1/τ, in the logits dtype. Masked rows read nothing and write zeros.

Rows are addressed as (row // rows_inner, row % rows_inner) with two strides, so a `[B, T, V]` view such as
`logits[:, :-1]` runs without a copy. The vocabulary size is a compile-time constant (one compilation per
model; it also keeps loop bounds static, which the interpreter needs with NumPy >= 2.4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from rlhf_fast.ops._backend import triton_interpreting
from rlhf_fast.ops._contract import KL_CODES

if TYPE_CHECKING:
    from rlhf_fast.ops.logprob.spec import LogprobGrads, LogprobSpec


@triton.jit
def kl_and_slope(logp, ref, KL_KIND: tl.constexpr):
    """Per-token KL estimate against `ref` and its derivative with respect to logp."""
    diff = logp - ref
    if KL_KIND == 1:
        kl = diff
        slope = diff * 0.0 + 1.0
    elif KL_KIND == 2:
        kl = 0.5 * diff * diff
        slope = diff
    else:
        ratio = tl.exp(-diff)  # exp(ref − logp)
        kl = ratio + diff - 1.0
        slope = 1.0 - ratio
    return kl, slope


@triton.jit
def logprob_coefficient(grad_logp_ptr, grad_kl_ptr, ref_ptr, logp_ptr, row, KL_KIND: tl.constexpr):
    """a = dL/dlogp + dL/dKL · dKL/dlogp for one row (or a block of rows: `row` may be a vector)."""
    a = tl.load(grad_logp_ptr + row).to(tl.float32)
    if KL_KIND != 0:
        logp = tl.load(logp_ptr + row)
        ref = tl.load(ref_ptr + row)
        _, slope = kl_and_slope(logp, ref, KL_KIND)
        a += tl.load(grad_kl_ptr + row).to(tl.float32) * slope
    return a


@triton.jit
def _rows_forward_kernel(
    LOGITS,
    TARGETS,
    MASK,
    REF,
    LOGP,
    ENTROPY,
    KL,
    LSE,
    rows_inner,
    stride_outer,
    stride_inner,
    stride_v,
    inv_temp,
    V: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    KL_KIND: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_MASK:  # noqa: SIM102 (a compile-time flag, then a runtime test)
        if tl.load(MASK + row) == 0:  # a masked row reads nothing and writes zeros
            tl.store(LOGP + row, 0.0)
            tl.store(LSE + row, 0.0)
            if WANT_ENTROPY:
                tl.store(ENTROPY + row, 0.0)
            if KL_KIND != 0:
                tl.store(KL + row, 0.0)
            return
    base = LOGITS + (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner

    running_max = float("-inf")
    sum_exp = 0.0
    sum_exp_shifted = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(base + cols * stride_v, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temp
        new_max = tl.maximum(running_max, tl.max(z, 0))
        # A block (or row prefix) of -inf logits leaves the max at -inf: subtract 0 instead of -inf.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        exps = tl.exp(z - safe_max)
        rescale = tl.exp(running_max - safe_max)
        if WANT_ENTROPY:
            shifted = exps * tl.where(exps > 0.0, z - safe_max, 0.0)
            shift = tl.where(running_max == float("-inf"), 0.0, running_max - safe_max)
            sum_exp_shifted = rescale * (sum_exp_shifted + shift * sum_exp) + tl.sum(shifted, 0)
        sum_exp = sum_exp * rescale + tl.sum(exps, 0)
        running_max = new_max

    log_sum = tl.log(sum_exp)
    lse = running_max + log_sum
    target = tl.load(TARGETS + row).to(tl.int64)
    z_target = tl.load(base + target * stride_v).to(tl.float32) * inv_temp
    logp = z_target - lse
    tl.store(LOGP + row, logp)
    tl.store(LSE + row, lse)
    if WANT_ENTROPY:
        tl.store(ENTROPY + row, log_sum - sum_exp_shifted / sum_exp)
    if KL_KIND != 0:
        kl, _ = kl_and_slope(logp, tl.load(REF + row), KL_KIND)
        tl.store(KL + row, kl)


@triton.jit
def _rows_backward_kernel(
    LOGITS,
    TARGETS,
    MASK,
    REF,
    LOGP,
    ENTROPY,
    LSE,
    GRAD_LOGP,
    GRAD_ENTROPY,
    GRAD_KL,
    GRAD_LOGITS,
    rows_inner,
    stride_outer,
    stride_inner,
    stride_v,
    inv_temp,
    V: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    KL_KIND: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    out = GRAD_LOGITS + row * V
    if HAS_MASK:  # noqa: SIM102 (a compile-time flag, then a runtime test)
        if tl.load(MASK + row) == 0:  # a masked row reads nothing and gets a zero gradient
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(out + cols, tl.zeros([BLOCK_V], dtype=tl.float32), mask=cols < V)
            return
    base = LOGITS + (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner

    a = logprob_coefficient(GRAD_LOGP, GRAD_KL, REF, LOGP, row, KL_KIND) * inv_temp
    b = 0.0
    entropy = 0.0
    if HAS_GRAD_ENTROPY:
        b = tl.load(GRAD_ENTROPY + row).to(tl.float32) * inv_temp
        entropy = tl.load(ENTROPY + row)
    lse = tl.load(LSE + row)
    target = tl.load(TARGETS + row).to(tl.int64)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(base + cols * stride_v, mask=in_row, other=0.0).to(tl.float32) * inv_temp
        logp_all = z - lse
        probs = tl.exp(logp_all)
        grad = -a * probs
        if HAS_GRAD_ENTROPY:
            grad -= b * probs * tl.where(probs > 0.0, logp_all + entropy, 0.0)
        grad = tl.where(cols == target, grad + a, grad)
        tl.store(out + cols, grad, mask=in_row)


def _row_layout(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """(tensor, rows_inner, stride_outer, stride_inner, stride_v) addressing every row without a copy where
    the leading dimensions allow it (any 1-D/2-D/3-D strided view; deeper inputs are reshaped)."""
    vocab = logits.shape[-1]
    if logits.dim() > 3:
        logits = logits.reshape(-1, logits.shape[-2], vocab)
    if logits.dim() == 3:
        outer, inner, _ = logits.shape
        if outer == 1 or inner == 1:
            flat = logits.reshape(-1, vocab) if logits.numel() else logits.new_empty(0, vocab)
            return flat, max(flat.shape[0], 1), 0, flat.stride(0), flat.stride(1)
        return logits, inner, logits.stride(0), logits.stride(1), logits.stride(2)
    if logits.dim() == 1:
        return logits, 1, 0, 0, logits.stride(0)
    return logits, max(logits.shape[0], 1), 0, logits.stride(0), logits.stride(1)


def _block_and_warps(vocab: int, element_size: int) -> tuple[int, int]:
    if triton_interpreting():  # the interpreter's cost is per block: use the largest
        return min(triton.next_power_of_2(max(vocab, 1)), 8192), 4
    block = min(triton.next_power_of_2(max(vocab, 1)), 8192 // element_size * 2)  # 16 KiB of logits
    warps = 4 if block <= 2048 else 8 if block <= 4096 else 16
    return block, warps


def token_logprobs_forward_triton(
    logits: torch.Tensor, spec: LogprobSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [..., V] fp32/bf16/fp16 -> (logprobs, entropy or empty, kl or empty, lse), each fp32 [N]."""
    targets, mask, ref_logprobs = spec.targets, spec.mask, spec.ref_logprobs
    temperature, kl_estimator, want_entropy = spec.temperature, spec.kl_estimator, spec.want_entropy
    vocab = logits.shape[-1]
    rows = targets.numel()
    device = logits.device
    logp = torch.empty(rows, dtype=torch.float32, device=device)
    lse = torch.empty(rows, dtype=torch.float32, device=device)
    entropy = torch.empty(rows if want_entropy else 0, dtype=torch.float32, device=device)
    kl_kind = KL_CODES[kl_estimator] if ref_logprobs is not None else 0
    kl = torch.empty(rows if kl_kind else 0, dtype=torch.float32, device=device)
    if rows == 0:
        return logp, entropy, kl, lse
    view, rows_inner, stride_outer, stride_inner, stride_v = _row_layout(logits)
    block, warps = _block_and_warps(vocab, logits.element_size())
    _rows_forward_kernel[(rows,)](
        view,
        targets.reshape(-1).contiguous(),
        mask_arg(mask),
        _ref_arg(ref_logprobs, logp),
        logp,
        entropy,
        kl,
        lse,
        rows_inner,
        stride_outer,
        stride_inner,
        stride_v,
        1.0 / temperature,
        V=vocab,
        HAS_MASK=mask is not None,
        WANT_ENTROPY=want_entropy,
        KL_KIND=kl_kind,
        BLOCK_V=block,
        num_warps=warps,
    )
    return logp, entropy, kl, lse


def token_logprobs_backward_triton(
    logits: torch.Tensor, spec: LogprobSpec, grads: LogprobGrads
) -> torch.Tensor:
    """The gradient with respect to logits: contiguous, same shape and dtype as `logits`."""
    targets, mask, ref_logprobs = spec.targets, spec.mask, spec.ref_logprobs
    temperature, kl_estimator = spec.temperature, spec.kl_estimator
    grad_logprobs, grad_entropy, grad_kl = grads.grad_logprobs, grads.grad_entropy, grads.grad_kl
    logprobs, entropy, lse = grads.logprobs, grads.entropy, grads.lse
    vocab = logits.shape[-1]
    rows = targets.numel()
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if rows == 0 or vocab == 0:
        return grad_logits
    view, rows_inner, stride_outer, stride_inner, stride_v = _row_layout(logits)
    kl_kind = KL_CODES[kl_estimator] if (ref_logprobs is not None and grad_kl is not None) else 0
    block, warps = _block_and_warps(vocab, logits.element_size())
    _rows_backward_kernel[(rows,)](
        view,
        targets.reshape(-1).contiguous(),
        mask_arg(mask),
        _ref_arg(ref_logprobs, logprobs),
        logprobs,
        entropy if grad_entropy is not None else lse,
        lse,
        grad_logprobs.reshape(-1).float().contiguous(),
        row_vector(grad_entropy, lse),
        row_vector(grad_kl if kl_kind else None, lse),
        grad_logits,
        rows_inner,
        stride_outer,
        stride_inner,
        stride_v,
        1.0 / temperature,
        V=vocab,
        HAS_MASK=mask is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        KL_KIND=kl_kind,
        BLOCK_V=block,
        num_warps=warps,
    )
    return grad_logits


def mask_arg(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask as the kernels read it: flat, contiguous, bool viewed as uint8."""
    if mask is None:
        return None
    mask = mask.reshape(-1).contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _ref_arg(ref_logprobs: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    return placeholder if ref_logprobs is None else ref_logprobs.reshape(-1).float().contiguous()


def row_vector(grad: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """grad as a flat float32 vector, or `placeholder` (a never-read pointer) when there is none."""
    return placeholder if grad is None else grad.reshape(-1).float().contiguous()
