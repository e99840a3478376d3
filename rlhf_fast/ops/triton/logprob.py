"""Triton kernels for per-token log-prob / entropy / KL from logits (see rlhf_fast/ops/logprob/).

One kernel, `_rows_kernel`, one program per row, in either direction (BACKWARD, a compile-time flag).

Forward: streams the vocabulary once in blocks, keeping a running max m, the rescaled sum-exp s0 = Σ e^{z−m}
and (for entropy) s1 = Σ e^{z−m}·(z−m) (`online_softmax_update`, which the linear kernels share); then
lse = m + log s0, H = log s0 − s1/s0, log p_y = z_y − lse, and the KL term against the reference log-prob.
Only lse is saved for backward besides the outputs themselves.

Backward: recomputes p = exp(z − lse) block by block and writes, for z = logits / τ,

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
def online_softmax_update(
    running_max, sum_exp, sum_shifted, z, AXIS: tl.constexpr, WANT_ENTROPY: tl.constexpr
):
    """Folds a block of logits z into per-row statistics along AXIS: the running max m, s0 = Σ e^{z−m} and
    (for entropy) s1 = Σ e^{z−m}·(z−m), the old sums rescaled to the new max. Returns (m, s0, s1)."""
    new_max = tl.maximum(running_max, tl.max(z, AXIS))
    # A block (or row prefix) of -inf logits leaves the max at -inf: subtract 0 instead of -inf.
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    centered = z - tl.expand_dims(safe_max, AXIS)
    exps = tl.exp(centered)
    rescale = tl.exp(running_max - safe_max)
    if WANT_ENTROPY:
        shifted = exps * tl.where(exps > 0.0, centered, 0.0)
        shift = tl.where(running_max == float("-inf"), 0.0, running_max - safe_max)
        sum_shifted = rescale * (sum_shifted + shift * sum_exp) + tl.sum(shifted, AXIS)
    sum_exp = sum_exp * rescale + tl.sum(exps, AXIS)
    return new_max, sum_exp, sum_shifted


@triton.jit
def _rows_kernel(
    LOGITS,
    TARGETS,
    MASK,
    REF,
    LOGP,
    ENTROPY,
    KL,
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
    WITH_ENTROPY: tl.constexpr,
    KL_KIND: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """One row. Forward: writes LOGP and LSE, ENTROPY if WITH_ENTROPY and KL if KL_KIND != 0.
    Backward: writes the row of GRAD_LOGITS from the forward's LOGP, ENTROPY and LSE and the outputs'
    gradients GRAD_* (WITH_ENTROPY: the entropy has one). What a direction does not use (KL backward,
    GRAD_* forward) is never read."""
    row = tl.program_id(0).to(tl.int64)
    out = GRAD_LOGITS + row * V
    if HAS_MASK:  # noqa: SIM102 (a compile-time flag, then a runtime test)
        if tl.load(MASK + row) == 0:  # a masked row reads nothing and writes zeros
            if BACKWARD:
                for start in range(0, V, BLOCK_V):
                    cols = start + tl.arange(0, BLOCK_V)
                    tl.store(out + cols, tl.zeros([BLOCK_V], dtype=tl.float32), mask=cols < V)
            else:
                tl.store(LOGP + row, 0.0)
                tl.store(LSE + row, 0.0)
                if WITH_ENTROPY:
                    tl.store(ENTROPY + row, 0.0)
                if KL_KIND != 0:
                    tl.store(KL + row, 0.0)
            return
    base = LOGITS + (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner

    if BACKWARD:
        a = logprob_coefficient(GRAD_LOGP, GRAD_KL, REF, LOGP, row, KL_KIND) * inv_temp
        b = 0.0
        entropy = 0.0
        if WITH_ENTROPY:
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
            if WITH_ENTROPY:
                grad -= b * probs * tl.where(probs > 0.0, logp_all + entropy, 0.0)
            grad = tl.where(cols == target, grad + a, grad)
            tl.store(out + cols, grad, mask=in_row)
    else:
        running_max = float("-inf")
        sum_exp = 0.0
        sum_shifted = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + cols * stride_v, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
            running_max, sum_exp, sum_shifted = online_softmax_update(
                running_max, sum_exp, sum_shifted, z, 0, WITH_ENTROPY
            )
        log_sum = tl.log(sum_exp)
        lse = running_max + log_sum
        target = tl.load(TARGETS + row).to(tl.int64)
        z_target = tl.load(base + target * stride_v).to(tl.float32) * inv_temp
        logp = z_target - lse
        tl.store(LOGP + row, logp)
        tl.store(LSE + row, lse)
        if WITH_ENTROPY:
            tl.store(ENTROPY + row, log_sum - sum_shifted / sum_exp)
        if KL_KIND != 0:
            kl, _ = kl_and_slope(logp, tl.load(REF + row), KL_KIND)
            tl.store(KL + row, kl)


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
    outputs = forward_outputs(spec.rows, spec, logits.device)
    if spec.rows:
        placeholders = (outputs[-1],) * 4  # the backward's gradients, never read
        _launch(logits, spec, outputs, placeholders, spec.want_entropy, kl_kind(spec), backward=False)
    return outputs


def token_logprobs_backward_triton(
    logits: torch.Tensor, spec: LogprobSpec, grads: LogprobGrads
) -> torch.Tensor:
    """The gradient with respect to logits: contiguous, same shape and dtype as `logits`."""
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if spec.rows == 0 or logits.shape[-1] == 0:
        return grad_logits
    with_entropy, kind, lse = grads.grad_entropy is not None, kl_kind(spec, grads), grads.lse
    saved = (grads.logprobs, grads.entropy if with_entropy else lse, lse, lse)  # lse stands in for kl
    gradients = (*gradient_rows(grads, kind), grad_logits)
    _launch(logits, spec, saved, gradients, with_entropy, kind, backward=True)
    return grad_logits


def _launch(logits, spec, outputs, gradients, with_entropy: bool, kind: int, backward: bool) -> None:
    """One program per row; `outputs`: (logp, entropy, kl, lse), written forward and read backward;
    `gradients`: (d logp, d entropy, d kl, d logits), read and written backward."""
    view, rows_inner, stride_outer, stride_inner, stride_v = _row_layout(logits)
    block, warps = _block_and_warps(logits.shape[-1], logits.element_size())
    _rows_kernel[(spec.rows,)](
        view,
        *row_inputs(spec, outputs[0]),
        *outputs,
        *gradients,
        rows_inner,
        stride_outer,
        stride_inner,
        stride_v,
        spec.inv_temp,
        V=logits.shape[-1],
        HAS_MASK=spec.mask is not None,
        WITH_ENTROPY=with_entropy,
        KL_KIND=kind,
        BLOCK_V=block,
        BACKWARD=backward,
        num_warps=warps,
    )


# ----------------------------------------------------------------------------------------------------------
# Launch arguments, shared with the kernels from hidden × LM head (linear_logprob.py).
# ----------------------------------------------------------------------------------------------------------


def kl_kind(spec: LogprobSpec, grads: LogprobGrads | None = None) -> int:
    """The kernels' KL_KIND: the estimator's code, or 0 without a reference (backward: or without d kl)."""
    if spec.ref_logprobs is None or (grads is not None and grads.grad_kl is None):
        return 0
    return KL_CODES[spec.kl_estimator]


def forward_outputs(rows: int, spec: LogprobSpec, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Uninitialized float32 (logprobs [rows], entropy [rows] or [0], kl [rows] or [0], lse [rows])."""

    def empty(wanted: bool) -> torch.Tensor:
        return torch.empty(rows if wanted else 0, dtype=torch.float32, device=device)

    return empty(True), empty(spec.want_entropy), empty(kl_kind(spec) != 0), empty(True)


def row_inputs(spec: LogprobSpec, placeholder: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(targets, mask, ref_logprobs) as the kernels read them: flat and contiguous, a bool mask viewed as
    uint8 (None without a mask), the reference in float32 (`placeholder`, never read, without one)."""
    mask = spec.mask
    if mask is not None:
        mask = mask.reshape(-1).contiguous()
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return spec.targets.reshape(-1).contiguous(), mask, row_vector(spec.ref_logprobs, placeholder)


def gradient_rows(grads: LogprobGrads, kind: int) -> tuple[torch.Tensor, ...]:
    """(d logprobs, d entropy, d kl) as flat float32 vectors; lse stands in for one that is absent (d kl
    also when `kind`, the KL_KIND, is 0)."""
    return (
        row_vector(grads.grad_logprobs, grads.lse),
        row_vector(grads.grad_entropy, grads.lse),
        row_vector(grads.grad_kl if kind else None, grads.lse),
    )


def row_vector(values: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """values as a flat float32 vector, or `placeholder` (a never-read pointer) when there are none."""
    return placeholder if values is None else values.reshape(-1).float().contiguous()
