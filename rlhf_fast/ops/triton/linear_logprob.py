"""Triton kernels for per-token log-prob / entropy / KL from hidden states × LM head (see ../logprob/).

The [N, V] logits are never stored whole.

Forward, two launches:
  1. `_partial_stats_kernel`, grid (row blocks, vocabulary splits): each program computes its logit tiles
     z = (h @ Wᵀ + b) / τ with tl.dot over d, and folds each tile into per-row online-softmax statistics
     (running max m, s0 = Σ e^{z−m}, s1 = Σ e^{z−m}(z−m): logprob.py's `online_softmax_update`, and the
     target's logit if it falls in the split). Splitting the vocabulary keeps every SM busy when there are
     few row blocks.
  2. `_combine_kernel` merges the splits' statistics per row into lse, log p_y, entropy and KL.

Backward, per vocabulary chunk of C columns (so the extra memory is one [N, C] buffer, not [N, V]):
  1. `_grad_logits_kernel` recomputes each logit tile and writes G = dL/dlogits for the chunk in the input
     dtype (the softmax statistics come from forward: lse and the entropy), adding its column sums into
     grad_bias with atomics.
  2. cuBLAS: grad_weight[chunk] = Gᵀ @ h (complete for the chunk, no accumulation) and
     grad_hidden += G @ W[chunk], accumulated in float32.
Total work: 4·N·d·V multiply-adds (forward, recompute, two gradient GEMMs).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from rlhf_fast.ops._backend import triton_interpreting
from rlhf_fast.ops.triton.logprob import (
    forward_outputs,
    gradient_rows,
    kl_and_slope,
    kl_kind,
    logprob_coefficient,
    online_softmax_update,
    row_inputs,
)

if TYPE_CHECKING:
    from rlhf_fast.ops.logprob.spec import LogprobGrads, LogprobSpec

# The largest per-chunk gradient buffer the backward allocates (bytes of G = [N, C]).
GRAD_CHUNK_BYTES = 64 * 2**20
# Vocabulary splits and gradient chunks are multiples of this many columns (a multiple of every BLOCK_N).
COLUMN_QUANTUM = 256


@triton.jit
def _logit_tile(
    lm_head,
    rows,
    cols,
    inv_temp,
    D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(h[rows] @ W[cols]ᵀ + b[cols]) / τ as a float32 [len(rows), len(cols)] tile, for
    lm_head = (H, W, BIAS, stride_hn, stride_hd, stride_wv, stride_wd); rows and cols must be in range."""
    H, W, BIAS, stride_hn, stride_hd, stride_wv, stride_wd = lm_head
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = H + rows[:, None] * stride_hn + offs_k[None, :] * stride_hd
    w_ptrs = W + cols[None, :] * stride_wv + offs_k[:, None] * stride_wd
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if D % BLOCK_K == 0:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_in = (k0 + offs_k) < D
            h = tl.load(h_ptrs, mask=k_in[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
        # Triton 3.6's interpreter multiplies bfloat16 wrongly: widen first.
        if DOT_PRECISION == "interpreter":
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hd
        w_ptrs += BLOCK_K * stride_wd
    if HAS_BIAS:
        acc += tl.load(BIAS + cols).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def _partial_stats_kernel(
    H,
    W,
    BIAS,
    TARGETS,
    MASK,
    PARTIALS,
    N,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    inv_temp,
    V: tl.constexpr,
    D: tl.constexpr,
    SPLIT_COLS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < N
    valid = row_in
    if HAS_MASK:
        valid = valid & (tl.load(MASK + rows, mask=row_in, other=0) != 0)
    # PARTIALS is [4, splits, N]: running max, Σ e^{z−m}, Σ e^{z−m}(z−m), target logit.
    plane = tl.num_programs(1).to(tl.int64) * N
    out = PARTIALS + split * N + rows
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_shifted = tl.zeros([BLOCK_M], dtype=tl.float32)
    target_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    if tl.max(valid.to(tl.int32), 0) == 0:  # a block of masked rows does no matmul
        tl.store(out, running_max, mask=row_in)
        tl.store(out + plane, sum_exp, mask=row_in)
        tl.store(out + 2 * plane, sum_shifted, mask=row_in)
        tl.store(out + 3 * plane, target_logit, mask=row_in)
        return
    safe_rows = tl.where(row_in, rows, 0)
    targets = tl.load(TARGETS + rows, mask=valid, other=-1).to(tl.int64)
    lm_head = (H, W, BIAS, stride_hn, stride_hd, stride_wv, stride_wd)
    for tile in range(SPLIT_COLS // BLOCK_N):
        cols = split.to(tl.int64) * SPLIT_COLS + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_in = cols < V
        z = _logit_tile(
            lm_head, safe_rows, tl.where(col_in, cols, 0), inv_temp, D, HAS_BIAS, BLOCK_K, DOT_PRECISION
        )
        z = tl.where(col_in[None, :], z, float("-inf"))
        running_max, sum_exp, sum_shifted = online_softmax_update(
            running_max, sum_exp, sum_shifted, z, 1, WANT_ENTROPY
        )
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), 1)
    tl.store(out, running_max, mask=row_in)
    tl.store(out + plane, sum_exp, mask=row_in)
    tl.store(out + 2 * plane, sum_shifted, mask=row_in)
    tl.store(out + 3 * plane, target_logit, mask=row_in)


@triton.jit
def _combine_kernel(
    PARTIALS,
    MASK,
    REF,
    LOGP,
    ENTROPY,
    KL,
    LSE,
    N,
    num_splits,
    HAS_MASK: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    KL_KIND: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_in = rows < N
    splits = tl.arange(0, SPLITS_POW2)
    present = (splits[:, None] < num_splits) & row_in[None, :]
    offsets = splits[:, None].to(tl.int64) * N + rows[None, :]
    plane = num_splits * N  # < 2**31: splits ≤ 512
    part_max = tl.load(PARTIALS + offsets, mask=present, other=float("-inf"))
    part_sum = tl.load(PARTIALS + plane + offsets, mask=present, other=0.0)
    row_max = tl.max(part_max, 0)
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    weights = tl.exp(part_max - safe_max[None, :])
    sum_exp = tl.sum(part_sum * weights, 0)
    sum_exp = tl.where(sum_exp > 0.0, sum_exp, 1.0)  # masked rows: keep log and division finite
    log_sum = tl.log(sum_exp)
    lse = row_max + log_sum
    target_logit = tl.sum(tl.load(PARTIALS + 3 * plane + offsets, mask=present, other=0.0), 0)
    valid = row_in
    if HAS_MASK:
        valid = valid & (tl.load(MASK + rows, mask=row_in, other=0) != 0)
    logp = tl.where(valid, target_logit - lse, 0.0)
    tl.store(LOGP + rows, logp, mask=row_in)
    tl.store(LSE + rows, tl.where(valid, lse, 0.0), mask=row_in)
    if WANT_ENTROPY:
        part_shifted = tl.load(PARTIALS + 2 * plane + offsets, mask=present, other=0.0)
        shift = tl.where(part_max == float("-inf"), 0.0, part_max - safe_max[None, :])
        sum_shifted = tl.sum(weights * (part_shifted + shift * part_sum), 0)
        tl.store(ENTROPY + rows, tl.where(valid, log_sum - sum_shifted / sum_exp, 0.0), mask=row_in)
    if KL_KIND != 0:
        ref = tl.load(REF + rows, mask=valid, other=0.0)
        kl, _ = kl_and_slope(logp, ref, KL_KIND)
        tl.store(KL + rows, tl.where(valid, kl, 0.0), mask=row_in)


@triton.jit
def _grad_logits_kernel(
    H,
    W,
    BIAS,
    TARGETS,
    MASK,
    REF,
    LOGP,
    ENTROPY,
    LSE,
    GRAD_LOGP,
    GRAD_ENTROPY,
    GRAD_KL,
    G,
    GRAD_BIAS,
    N,
    col_begin,
    chunk_cols,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_gn,
    inv_temp,
    V: tl.constexpr,
    D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    KL_KIND: tl.constexpr,
    WANT_GRAD_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grouped launch order: GROUP_M consecutive row blocks sweep the same weight tiles while they are in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(N, BLOCK_M)
    blocks_n = tl.cdiv(chunk_cols, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    local_cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    col_in = local_cols < chunk_cols
    cols = col_begin + local_cols
    valid = row_in
    if HAS_MASK:
        valid = valid & (tl.load(MASK + rows, mask=row_in, other=0) != 0)
    g_ptrs = G + rows[:, None] * stride_gn + local_cols[None, :]
    store_mask = row_in[:, None] & col_in[None, :]
    if tl.max(valid.to(tl.int32), 0) == 0:  # a block of masked rows: zero gradient, no matmul
        tl.store(g_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=store_mask)
        return
    safe_rows = tl.where(row_in, rows, 0)
    a = (
        tl.where(valid, logprob_coefficient(GRAD_LOGP, GRAD_KL, REF, LOGP, safe_rows, KL_KIND), 0.0)
        * inv_temp
    )
    lse = tl.load(LSE + safe_rows)
    targets = tl.load(TARGETS + rows, mask=valid, other=-1).to(tl.int64)
    lm_head = (H, W, BIAS, stride_hn, stride_hd, stride_wv, stride_wd)
    z = _logit_tile(
        lm_head, safe_rows, tl.where(col_in, cols, 0), inv_temp, D, HAS_BIAS, BLOCK_K, DOT_PRECISION
    )
    log_probs = z - lse[:, None]
    probs = tl.exp(log_probs)
    grad = -a[:, None] * probs
    if HAS_GRAD_ENTROPY:
        b = tl.where(valid, tl.load(GRAD_ENTROPY + safe_rows).to(tl.float32), 0.0) * inv_temp
        entropy = tl.load(ENTROPY + safe_rows)
        grad -= b[:, None] * probs * tl.where(probs > 0.0, log_probs + entropy[:, None], 0.0)
    grad = tl.where(cols[None, :] == targets[:, None], grad + a[:, None], grad)
    grad = tl.where(valid[:, None] & col_in[None, :], grad, 0.0)
    tl.store(g_ptrs, grad.to(G.dtype.element_ty), mask=store_mask)
    if WANT_GRAD_BIAS:
        tl.atomic_add(GRAD_BIAS + local_cols, tl.sum(grad, 0), mask=col_in)


# ----------------------------------------------------------------------------------------------------------
# Launch configurations: autotuned on a GPU, fixed small tiles under the interpreter.
# ----------------------------------------------------------------------------------------------------------

# bf16/fp16 run on tensor cores (wgmma on Hopper). The forward tries two tile widths; the backward's heavier
# epilogue spills at 128x256 (ptxas, sm_90a: 255 registers + 500 B spills), so it keeps 128x128 (229 registers).
# float32 keeps full precision (input_precision="ieee", no TF32), i.e. no tensor cores: one modest tile.
_TILE_128x128 = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)
_TILE_128x256 = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3)
_TILE_FLOAT32 = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32}
# Row-block size the forward's vocabulary split is planned for (the configs' BLOCK_M on a GPU).
_PLANNED_BLOCK_M = 128


def _zero_grad_bias(kwargs, reset_only=False):
    # The autotuner's benchmark runs add into grad_bias repeatedly: start each from zero (None without a bias).
    if kwargs.get("GRAD_BIAS") is not None:
        kwargs["GRAD_BIAS"].zero_()


_TUNED = {
    (kernel.__name__, precision): triton.autotune(configs, key=key, pre_hook=hook)(kernel)
    for kernel, key, hook, low_precision_configs in (
        (_partial_stats_kernel, ["V", "D", "HAS_BIAS", "WANT_ENTROPY"], None, [_TILE_128x128, _TILE_128x256]),
        (_grad_logits_kernel, ["V", "D", "HAS_BIAS", "HAS_GRAD_ENTROPY"], _zero_grad_bias, [_TILE_128x128]),
    )
    for precision, configs in (("low", low_precision_configs), ("float32", [_TILE_FLOAT32]))
}


def _launch(kernel, dtype: torch.dtype, grid, *args, **kwargs):
    if triton_interpreting():
        kernel[grid(_INTERPRETER_CONFIG)](*args, **kwargs, **_INTERPRETER_CONFIG, num_warps=4)
        return
    precision = "float32" if dtype == torch.float32 else "low"
    _TUNED[(kernel.__name__, precision)][grid](*args, **kwargs)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _vocabulary_splits(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, columns per split): about two waves of programs, splits a multiple of 256 columns."""
    programs_wanted = 2 * (_multiprocessor_count(device.index or 0) if device.type == "cuda" else 4)
    row_blocks = triton.cdiv(max(rows, 1), _PLANNED_BLOCK_M if device.type == "cuda" else 16)
    splits = triton.next_power_of_2(triton.cdiv(programs_wanted, row_blocks))
    split_cols = triton.cdiv(triton.cdiv(vocab, splits), COLUMN_QUANTUM) * COLUMN_QUANTUM
    return triton.cdiv(vocab, split_cols), split_cols


def _dot_precision(dtype: torch.dtype) -> str:
    if triton_interpreting():
        return "interpreter"
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs keep full precision (no TF32)


def linear_token_logprobs_forward_triton(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: LogprobSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [..., d], weight [V, d], bias [V] -> (logprobs, entropy or [0], kl or [0], lse), float32 [N]."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    rows, vocab, width = flat_hidden.shape[0], weight.shape[0], weight.shape[1]
    device = hidden.device
    logp, entropy, kl, lse = forward_outputs(rows, spec, device)
    if rows == 0:
        return logp, entropy, kl, lse
    num_splits, split_cols = _vocabulary_splits(rows, vocab, device)
    partials = torch.empty(4, num_splits, rows, dtype=torch.float32, device=device)
    flat_targets, flat_mask, ref = row_inputs(spec, logp)
    _launch(
        _partial_stats_kernel,
        hidden.dtype,
        lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), num_splits),
        flat_hidden,
        weight,
        bias,
        flat_targets,
        flat_mask,
        partials,
        rows,
        flat_hidden.stride(0),
        flat_hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        spec.inv_temp,
        V=vocab,
        D=width,
        SPLIT_COLS=split_cols,
        HAS_BIAS=bias is not None,
        HAS_MASK=spec.mask is not None,
        WANT_ENTROPY=spec.want_entropy,
        DOT_PRECISION=_dot_precision(hidden.dtype),
    )
    block = 128 if num_splits <= 16 else 32
    _combine_kernel[(triton.cdiv(rows, block),)](
        partials,
        flat_mask,
        ref,
        logp,
        entropy,
        kl,
        lse,
        rows,
        num_splits,
        HAS_MASK=spec.mask is not None,
        WANT_ENTROPY=spec.want_entropy,
        KL_KIND=kl_kind(spec),
        SPLITS_POW2=triton.next_power_of_2(num_splits),
        BLOCK=block,
        num_warps=4,
    )
    return logp, entropy, kl, lse


def linear_token_logprobs_backward_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: LogprobSpec,
    grads: LogprobGrads,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_hidden or [0], grad_weight or [0], grad_bias or [0]) in the inputs' dtypes."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    rows, vocab, width = flat_hidden.shape[0], weight.shape[0], weight.shape[1]
    want_bias = bias is not None and need_weight
    grad_hidden = torch.zeros(rows, width, dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if want_bias else None
    if rows == 0:
        if need_weight:
            grad_weight.zero_()
        return _finish_grads(grad_hidden, hidden, grad_weight, grad_bias, weight)

    with_entropy, kind = grads.grad_entropy is not None, kl_kind(spec, grads)
    chunk_cols = max(
        COLUMN_QUANTUM, GRAD_CHUNK_BYTES // (rows * hidden.element_size()) // COLUMN_QUANTUM * COLUMN_QUANTUM
    )
    chunk_cols = min(chunk_cols, triton.cdiv(vocab, COLUMN_QUANTUM) * COLUMN_QUANTUM)
    grads_chunk = torch.empty(rows, chunk_cols, dtype=hidden.dtype, device=hidden.device)
    common = {
        "V": vocab,
        "D": width,
        "HAS_BIAS": bias is not None,
        "HAS_MASK": spec.mask is not None,
        "HAS_GRAD_ENTROPY": with_entropy,
        "KL_KIND": kind,
        "WANT_GRAD_BIAS": want_bias,
        "GROUP_M": 8,
        "DOT_PRECISION": _dot_precision(hidden.dtype),
    }
    flat_targets, flat_mask, ref = row_inputs(spec, grads.logprobs)
    grad_logp, grad_ent, grad_kl_flat = gradient_rows(grads, kind)
    entropy_arg = grads.entropy if with_entropy else grads.lse
    for col_begin in range(0, vocab, chunk_cols):
        cols = min(chunk_cols, vocab - col_begin)
        chunk = grads_chunk[:, :cols]
        _launch(
            _grad_logits_kernel,
            hidden.dtype,
            lambda meta, cols=cols: (
                triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),
            ),
            flat_hidden,
            weight,
            bias,
            flat_targets,
            flat_mask,
            ref,
            grads.logprobs.reshape(-1),
            entropy_arg.reshape(-1),
            grads.lse.reshape(-1),
            grad_logp,
            grad_ent,
            grad_kl_flat,
            chunk,
            grad_bias[col_begin : col_begin + cols] if want_bias else None,
            rows,
            col_begin,
            cols,
            flat_hidden.stride(0),
            flat_hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            chunk.stride(0),
            spec.inv_temp,
            **common,
        )
        weight_chunk = weight[col_begin : col_begin + cols]
        if need_weight:
            torch.mm(chunk.T, flat_hidden, out=grad_weight[col_begin : col_begin + cols])
        if need_hidden:
            grad_hidden = _accumulate_matmul(grad_hidden, chunk, weight_chunk)
    return _finish_grads(grad_hidden, hidden, grad_weight, grad_bias, weight)


def _finish_grads(grad_hidden, hidden, grad_weight, grad_bias, weight):
    return (
        hidden.new_empty(0) if grad_hidden is None else grad_hidden.to(hidden.dtype).reshape(hidden.shape),
        grad_weight,
        weight.new_empty(0) if grad_bias is None else grad_bias.to(weight.dtype),
    )


_fp32_output_gemm = {"works": None}


def _accumulate_matmul(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """accumulator (float32) + a @ b, with a low-precision product accumulated in float32 without rounding."""
    if a.dtype == accumulator.dtype:
        return accumulator.addmm_(a, b)
    if a.is_cuda and _fp32_output_gemm["works"] is not False:
        try:  # cuBLAS with bf16/fp16 inputs and a float32 C/D (torch >= 2.8 on CUDA)
            result = torch.addmm(accumulator, a, b, out_dtype=torch.float32)
            _fp32_output_gemm["works"] = True
            return result
        except (TypeError, RuntimeError, NotImplementedError):
            _fp32_output_gemm["works"] = False
    return accumulator.add_(torch.mm(a, b))
