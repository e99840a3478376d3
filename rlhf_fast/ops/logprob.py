"""Per-token log-prob, entropy and KL to a reference, from logits or from hidden states × LM head.

For z = logits / τ and p = softmax(z) over the vocabulary:

    logprobs = log p_y = z_y − lse(z)
    entropy  = −Σ_k p_k log p_k = lse(z) − Σ_k p_k z_k
    kl       = k1: logp − ref          k2: ½ (logp − ref)²          k3: exp(ref − logp) − (ref − logp) − 1

(k1/k2/k3 are Schulman's estimators of KL(π‖π_ref) from samples of π). Gradients, with a = dL/dlogp +
dL/dkl · dkl/dlogp and b = dL/dH:

    dL/dz_k = a · (1[k = y] − p_k) − b · p_k · (log p_k + H)          (dH/dz_k = −p_k (z_k − Σ_j p_j z_j))

and dL/dlogits = dL/dz / τ. ref_logprobs gets no gradient. Tokens with mask == 0 are skipped: their targets may
hold anything (e.g. −100 padding), they read no logits, and their outputs and gradients are 0.

`linear_token_logprobs` computes the same from hidden [.., d] and the LM head weight [V, d] (+ bias [V])
without ever holding the [N, V] logits at once: the logits are made tile by tile (tokens × vocabulary), each
tile is folded into per-row online-softmax statistics, and backward recomputes each tile. Nothing
vocabulary-sized per token is saved for backward: only the per-row lse (and the entropy, an output).

Backends: `reference` (below: the full log_softmax, for testing), `chunked` (plain torch over cache-sized
tiles, `CHUNK_ELEMENTS` elements each; the CPU default; masked tokens are dropped before any work, a host
sync), `triton` (rlhf_fast/ops/triton/logprob.py and linear_logprob.py; the GPU default; runs on CPU tensors
under TRITON_INTERPRET=1). Outputs are float32 (float64 for float64 inputs, which the Triton kernels do not
take: on a GPU they go to `chunked`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast.ops._backend import forced_backend, select_backend
from rlhf_fast.ops._checks import check_mask, check_same_device, check_tensor, value_checks_enabled

IMPLEMENTED = ("reference", "chunked", "triton")
GPU_ORDER = ("triton", "chunked")
KL_ESTIMATORS = ("k1", "k2", "k3")
# Elements of the largest temporary the chunked backend makes per tile (1 MiB of float32): small enough that
# its several passes over a tile run in cache.
CHUNK_ELEMENTS = 2**18
# Rows per tile of the chunked hidden × LM head path (the columns follow from CHUNK_ELEMENTS).
LINEAR_TILE_ROWS = 256
# log p (or z − max) is clamped here where it matters only through p = exp(.), which is exactly 0 below it in
# float32 and float64 alike: −inf logits then give p·log p = 0 instead of NaN, with finite products.
LOG_ZERO = -1e4


class TokenLogprobs(NamedTuple):
    """Per-token outputs, each float32 (float64 for float64 inputs) with the shape of `targets`."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    kl: torch.Tensor | None


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kl_and_slope(
    logp: torch.Tensor, ref: torch.Tensor, kl_estimator: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token KL estimate and its derivative with respect to logp."""
    diff = logp - ref
    if kl_estimator == "k1":
        return diff, torch.ones_like(diff)
    if kl_estimator == "k2":
        return 0.5 * diff * diff, diff
    ratio = torch.exp(-diff)
    return ratio + diff - 1.0, 1.0 - ratio


# ----------------------------------------------------------------------------------------------------------
# Plain-torch references (differentiable by autograd): the ground truth.
# ----------------------------------------------------------------------------------------------------------


def token_logprobs_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_estimator: str = "k1",
    return_entropy: bool = False,
) -> TokenLogprobs:
    """Plain torch: full log_softmax in float32 (float64 for float64 logits). Same contract as `token_logprobs`."""
    dtype = _output_dtype(logits.dtype)
    valid = torch.ones(targets.shape, dtype=torch.bool, device=logits.device) if mask is None else mask.bool()
    safe_targets = torch.where(valid, targets.long(), 0)
    log_probs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    logp = torch.where(valid, log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1), 0)
    entropy = kl = None
    if return_entropy:
        probs = log_probs.exp()
        plogp = torch.where(probs > 0, probs * log_probs, 0)  # p·log p → 0 where a logit is −inf
        entropy = torch.where(valid, -plogp.sum(-1), 0)
    if ref_logprobs is not None:
        kl = torch.where(valid, _kl_and_slope(logp, ref_logprobs.detach().to(dtype), kl_estimator)[0], 0)
    return TokenLogprobs(logp, entropy, kl)


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_estimator: str = "k1",
    return_entropy: bool = False,
) -> TokenLogprobs:
    """Plain torch: materializes the logits in float32 (float64 for float64 inputs)."""
    dtype = _output_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return token_logprobs_reference(
        logits,
        targets,
        ref_logprobs=ref_logprobs,
        mask=mask,
        temperature=temperature,
        kl_estimator=kl_estimator,
        return_entropy=return_entropy,
    )


# ----------------------------------------------------------------------------------------------------------
# Shared row math on one block of scaled logits z [n, V] (float32/float64).
# ----------------------------------------------------------------------------------------------------------


def _scaled(logits: torch.Tensor, inv_temp: float, dtype: torch.dtype, shift: torch.Tensor | None = None):
    """logits·inv_temp − shift[:, None] as a new `dtype` tensor, in one pass."""
    if shift is None:
        return logits.to(dtype, copy=True).mul_(inv_temp) if inv_temp != 1.0 else logits.to(dtype, copy=True)
    return (
        torch.add(-shift.unsqueeze(-1), logits, alpha=inv_temp)
        if inv_temp != 1.0
        else torch.sub(logits, shift.unsqueeze(-1))
    )


class _RunningRowStats:
    """Per-row online-softmax statistics over vocabulary tiles: max m, Σ e^{z−m}, Σ e^{z−m}(z−m), z_target."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device, want_entropy: bool):
        self.max = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        self.sum_exp = torch.zeros(rows, dtype=dtype, device=device)
        self.sum_shifted = torch.zeros(rows, dtype=dtype, device=device) if want_entropy else None
        self.target_logit = torch.zeros(rows, dtype=dtype, device=device)
        self.dtype = dtype

    def update(self, logits: torch.Tensor, local_targets: torch.Tensor, inv_temp: float) -> None:
        """Folds in one tile of logits [n, C] (any float dtype, not modified) whose columns start where
        `local_targets` (targets minus the tile's first column) counts from."""
        dtype, columns = self.dtype, logits.shape[-1]
        tile_max = logits.amax(-1).to(dtype) * inv_temp
        new_max = torch.maximum(self.max, tile_max)
        safe_max = torch.where(torch.isneginf(new_max), 0, new_max)  # a row of −inf so far: subtract 0
        inside = (local_targets >= 0) & (local_targets < columns)
        picked = logits.gather(-1, local_targets.clamp(0, columns - 1).unsqueeze(-1)).squeeze(-1)
        self.target_logit += torch.where(inside, picked.to(dtype) * inv_temp, 0)
        shifted = _scaled(logits, inv_temp, dtype, safe_max)  # z − max ≤ 0, a new tensor
        rescale = torch.exp(self.max - safe_max)
        if self.sum_shifted is None:
            self.sum_exp = self.sum_exp * rescale + shifted.exp_().sum(-1)
        else:
            shifted.clamp_(min=LOG_ZERO)  # −inf logits: p = 0 and p·(z − m) = 0, not NaN
            exps = torch.exp(shifted)
            # Σ p·(z − m) as a batch of dot products (no third [n, C] temporary).
            dot = torch.bmm(exps.unsqueeze(1), shifted.unsqueeze(2)).reshape(-1)
            shift = torch.where(torch.isneginf(self.max), 0, self.max - safe_max)
            self.sum_shifted = rescale * (self.sum_shifted + shift * self.sum_exp) + dot
            self.sum_exp = self.sum_exp * rescale + exps.sum(-1)
        self.max = new_max

    def finish(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(logp, entropy or None, lse) per row."""
        log_sum = self.sum_exp.log()
        lse = self.max + log_sum
        entropy = None if self.sum_shifted is None else log_sum - self.sum_shifted / self.sum_exp
        return self.target_logit - lse, entropy, lse


def _tile_grad_logits(
    logits: torch.Tensor,
    local_targets: torch.Tensor,
    inv_temp: float,
    lse: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None,
    entropy: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """dL/dz for one tile of logits [n, C] (z = logits·inv_temp), in `dtype`; a and b already carry the 1/τ of
    dz/dlogits (see the module docstring); `local_targets` counts from the tile's first column."""
    columns = logits.shape[-1]
    log_probs = _scaled(logits, inv_temp, dtype, lse)
    if b is None:
        grad = log_probs.exp_().mul_(-a.unsqueeze(-1))
    else:
        log_probs.clamp_(min=LOG_ZERO)
        probs = torch.exp(log_probs)
        # −p·(a + b·(log p + H)), reusing the log_probs buffer.
        coefficient = log_probs.add_(entropy.unsqueeze(-1)).mul_(b.unsqueeze(-1)).add_(a.unsqueeze(-1))
        grad = coefficient.mul_(probs).neg_()
    inside = (local_targets >= 0) & (local_targets < columns)
    grad.scatter_add_(
        -1, local_targets.clamp(0, columns - 1).unsqueeze(-1), torch.where(inside, a, 0).unsqueeze(-1)
    )
    return grad


def _row_coefficients(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    kl_estimator: str,
    inv_temp: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """a/τ and b/τ per row, flattened."""
    a = grad_logprobs.reshape(-1).to(dtype)
    if grad_kl is not None and ref_logprobs is not None:
        _, slope = _kl_and_slope(
            logprobs.reshape(-1).to(dtype), ref_logprobs.reshape(-1).to(dtype), kl_estimator
        )
        a = a + grad_kl.reshape(-1).to(dtype) * slope
    b = None if grad_entropy is None else grad_entropy.reshape(-1).to(dtype) * inv_temp
    return a * inv_temp, b


def _kl_output(
    logp: torch.Tensor, ref_logprobs: torch.Tensor | None, kl_estimator: str, valid
) -> torch.Tensor:
    if ref_logprobs is None:
        return logp.new_empty(0)
    kl = _kl_and_slope(logp, ref_logprobs.reshape(-1).to(logp.dtype), kl_estimator)[0]
    return kl if valid is None else torch.where(valid, kl, 0)


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _linear_tiles(rows: int, vocab: int) -> tuple[int, int]:
    """(rows, columns) of one tile of the chunked hidden × LM head path."""
    tile_rows = max(1, min(rows, LINEAR_TILE_ROWS))
    return tile_rows, max(1, min(vocab, CHUNK_ELEMENTS // tile_rows))


def _valid_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Indices of the valid rows, or None when every row is valid (a host sync; chunked backend only)."""
    if mask is None:
        return None
    flat = mask.reshape(-1).bool()
    if bool(flat.all()):
        return None
    return flat.nonzero().squeeze(-1)


def _flat_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits as [N, V]: a view when the leading dims allow it, else a copy."""
    return logits.reshape(-1, logits.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# From logits: reference and chunked implementations of the forward / backward ops.
# ----------------------------------------------------------------------------------------------------------


def _forward_reference(logits, targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy):
    dtype = _output_dtype(logits.dtype)
    flat, rows = _flat_rows(logits), targets.numel()
    valid = None if mask is None else mask.reshape(-1).bool()
    safe_targets = (
        targets.reshape(-1).long() if valid is None else torch.where(valid, targets.reshape(-1).long(), 0)
    )
    z = flat.to(dtype) / temperature
    lse = torch.logsumexp(z, dim=-1) if rows else z.new_empty(0)
    log_probs = z - lse.unsqueeze(-1)
    logp = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    entropy = logp.new_empty(0)
    if want_entropy:
        probs = log_probs.exp()
        entropy = -torch.where(probs > 0, probs * log_probs, 0).sum(-1)
    outputs = [logp, entropy, None, lse]
    if valid is not None:
        outputs = [o if o is None or o.numel() == 0 else torch.where(valid, o, 0) for o in outputs]
    outputs[2] = _kl_output(outputs[0], ref_logprobs, kl_estimator, valid)
    return tuple(outputs)


def _backward_reference(
    grad_logprobs,
    grad_entropy,
    grad_kl,
    logits,
    targets,
    mask,
    ref_logprobs,
    logprobs,
    entropy,
    lse,
    temperature,
    kl_estimator,
):
    dtype = _output_dtype(logits.dtype)
    flat = _flat_rows(logits)
    valid = None if mask is None else mask.reshape(-1).bool()
    safe_targets = (
        targets.reshape(-1).long() if valid is None else torch.where(valid, targets.reshape(-1).long(), 0)
    )
    a, b = _row_coefficients(
        grad_logprobs, grad_entropy, grad_kl, logprobs, ref_logprobs, kl_estimator, 1.0 / temperature, dtype
    )
    log_probs = flat.to(dtype) / temperature - lse.reshape(-1, 1).to(dtype)
    probs = log_probs.exp()
    onehot = torch.zeros_like(probs).scatter_(-1, safe_targets.unsqueeze(-1), 1.0)
    grad = a.unsqueeze(-1) * (onehot - probs)
    if b is not None:
        grad = grad - torch.where(
            probs > 0, b.unsqueeze(-1) * probs * (log_probs + entropy.reshape(-1, 1)), 0
        )
    if valid is not None:
        grad = torch.where(valid.unsqueeze(-1), grad, 0)
    return grad.to(logits.dtype).reshape(logits.shape)


def _forward_chunked(logits, targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy):
    dtype = _output_dtype(logits.dtype)
    flat, rows, vocab = _flat_rows(logits), targets.numel(), logits.shape[-1]
    flat_targets = targets.reshape(-1).long()
    logp = torch.zeros(rows, dtype=dtype, device=logits.device)
    lse = torch.zeros_like(logp)
    entropy = torch.zeros_like(logp) if want_entropy else logp.new_empty(0)
    valid_rows = _valid_rows(mask)
    count = rows if valid_rows is None else valid_rows.numel()
    step = _rows_per_chunk(vocab)
    for begin in range(0, count, step):
        end = min(begin + step, count)
        if valid_rows is None:
            index = slice(begin, end)
            block, block_targets = flat[begin:end], flat_targets[begin:end]
        else:
            index = valid_rows[begin:end]
            block, block_targets = flat.index_select(0, index), flat_targets.index_select(0, index)
        stats = _RunningRowStats(block.shape[0], dtype, block.device, want_entropy)
        stats.update(block, block_targets, 1.0 / temperature)
        block_logp, block_entropy, block_lse = stats.finish()
        logp[index], lse[index] = block_logp, block_lse
        if want_entropy:
            entropy[index] = block_entropy
    valid = None if mask is None else mask.reshape(-1).bool()
    return logp, entropy, _kl_output(logp, ref_logprobs, kl_estimator, valid), lse


def _backward_chunked(
    grad_logprobs,
    grad_entropy,
    grad_kl,
    logits,
    targets,
    mask,
    ref_logprobs,
    logprobs,
    entropy,
    lse,
    temperature,
    kl_estimator,
):
    dtype = _output_dtype(logits.dtype)
    flat, rows, vocab = _flat_rows(logits), targets.numel(), logits.shape[-1]
    flat_targets = targets.reshape(-1).long()
    a, b = _row_coefficients(
        grad_logprobs, grad_entropy, grad_kl, logprobs, ref_logprobs, kl_estimator, 1.0 / temperature, dtype
    )
    flat_entropy = entropy.reshape(-1).to(dtype) if b is not None else None
    flat_lse = lse.reshape(-1).to(dtype)
    valid_rows = _valid_rows(mask)
    grad_logits = (torch.empty if valid_rows is None else torch.zeros)(
        rows, vocab, dtype=logits.dtype, device=logits.device
    )
    count = rows if valid_rows is None else valid_rows.numel()
    step = _rows_per_chunk(vocab)
    for begin in range(0, count, step):
        end = min(begin + step, count)
        index = slice(begin, end) if valid_rows is None else valid_rows[begin:end]
        block = flat[index] if valid_rows is None else flat.index_select(0, index)
        block_grad = _tile_grad_logits(
            block,
            flat_targets[index],
            1.0 / temperature,
            flat_lse[index],
            a[index],
            None if b is None else b[index],
            None if b is None else flat_entropy[index],
            dtype,
        )
        grad_logits[index] = block_grad.to(logits.dtype)
    return grad_logits.reshape(logits.shape)


# ----------------------------------------------------------------------------------------------------------
# From logits: the custom ops and their autograd.
# ----------------------------------------------------------------------------------------------------------


def _pick_backend(op_name: str, device: torch.device, dtype: torch.dtype) -> str:
    backend = select_backend(op_name, device, IMPLEMENTED, GPU_ORDER)
    if backend == "triton" and dtype == torch.float64:
        # float64 is a testing dtype: the Triton kernels compute in float32, so the default goes to plain torch.
        if forced_backend() == "triton":
            raise RuntimeError(
                f"rlhf_fast: the triton backend of {op_name} takes float32/bfloat16/float16 inputs"
            )
        return "chunked"
    return backend


def _shape_outputs(outputs, shape: torch.Size, want_entropy: bool, has_kl: bool) -> tuple[torch.Tensor, ...]:
    """Flat per-row outputs -> targets' shape; an output not asked for stays a [0] placeholder."""
    logp, entropy, kl, lse = outputs
    return (
        logp.reshape(shape),
        entropy.reshape(shape) if want_entropy else entropy,
        kl.reshape(shape) if has_kl else kl,
        lse.reshape(shape),
    )


def _fake_forward_outputs(like, targets, ref_logprobs, want_entropy) -> tuple[torch.Tensor, ...]:
    """The forward ops' outputs as the fake kernels give them: (logprobs, entropy or [0], kl or [0], lse) on
    `like`'s device, in the output dtype of `like`'s dtype."""
    dtype = _output_dtype(like.dtype)
    return (
        like.new_empty(targets.shape, dtype=dtype),
        like.new_empty(targets.shape if want_entropy else (0,), dtype=dtype),
        like.new_empty(targets.shape if ref_logprobs is not None else (0,), dtype=dtype),
        like.new_empty(targets.shape, dtype=dtype),
    )


@torch.library.custom_op("rlhf_fast::token_logprobs_forward", mutates_args=())
def _token_logprobs_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    temperature: float,
    kl_estimator: str,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logprobs, entropy or [0], kl or [0], lse), each of targets' shape, float32 (float64)."""
    backend = _pick_backend("token_logprobs", logits.device, logits.dtype)
    if backend == "triton":
        from rlhf_fast.ops.triton.logprob import token_logprobs_forward_triton

        outputs = token_logprobs_forward_triton(
            logits, targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy
        )
    elif backend == "chunked":
        outputs = _forward_chunked(
            logits, targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy
        )
    else:
        outputs = _forward_reference(
            logits, targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy
        )
    return _shape_outputs(outputs, targets.shape, want_entropy, ref_logprobs is not None)


@_token_logprobs_forward.register_fake
def _(logits, targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy):
    return _fake_forward_outputs(logits, targets, ref_logprobs, want_entropy)


@torch.library.custom_op("rlhf_fast::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    kl_estimator: str,
) -> torch.Tensor:
    """-> dL/dlogits, contiguous, with logits' shape and dtype."""
    args = (
        grad_logprobs,
        grad_entropy,
        grad_kl,
        logits,
        targets,
        mask,
        ref_logprobs,
        logprobs,
        entropy,
        lse,
        temperature,
        kl_estimator,
    )
    backend = _pick_backend("token_logprobs", logits.device, logits.dtype)
    if backend == "triton":
        from rlhf_fast.ops.triton.logprob import token_logprobs_backward_triton

        return token_logprobs_backward_triton(*args)
    if backend == "chunked":
        return _backward_chunked(*args)
    return _backward_reference(*args)


@_token_logprobs_backward.register_fake
def _(
    grad_logprobs,
    grad_entropy,
    grad_kl,
    logits,
    targets,
    mask,
    ref_logprobs,
    logprobs,
    entropy,
    lse,
    temperature,
    kl_estimator,
):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _token_setup_context(ctx, inputs, output):
    logits, targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy = inputs
    logprobs, entropy, _, lse = output
    ctx.save_for_backward(logits, targets, mask, ref_logprobs, logprobs, entropy, lse)
    ctx.temperature, ctx.kl_estimator, ctx.want_entropy = temperature, kl_estimator, want_entropy


def _token_autograd_backward(ctx, grad_logprobs, grad_entropy, grad_kl, _grad_lse):
    logits, targets, mask, ref_logprobs, logprobs, entropy, lse = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = _token_logprobs_backward(
            *_output_grads(ctx, grad_logprobs, grad_entropy, grad_kl, logprobs, ref_logprobs),
            logits,
            targets,
            mask,
            ref_logprobs,
            logprobs,
            entropy,
            lse,
            ctx.temperature,
            ctx.kl_estimator,
        )
    return grad_logits, None, None, None, None, None, None


def _grad_or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _output_grads(ctx, grad_logprobs, grad_entropy, grad_kl, logprobs, ref_logprobs):
    """The gradients the backward ops take: d logprobs (zeros when none came), d entropy and d kl (None when
    the output was not asked for or got no gradient)."""
    return (
        _grad_or_zeros(grad_logprobs, logprobs),
        grad_entropy if ctx.want_entropy and grad_entropy is not None else None,
        grad_kl if ref_logprobs is not None and grad_kl is not None else None,
    )


_token_logprobs_forward.register_autograd(_token_autograd_backward, setup_context=_token_setup_context)


# ----------------------------------------------------------------------------------------------------------
# From hidden states × LM head: reference and chunked implementations.
# ----------------------------------------------------------------------------------------------------------


def _linear_compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    # On a CPU low-precision matmuls are no faster and round the logits: compute them in float32 there.
    if hidden.dtype == torch.float64:
        return torch.float64
    return torch.float32 if hidden.device.type == "cpu" else hidden.dtype


def _linear_forward_reference(
    hidden, weight, bias, targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy
):
    dtype = _output_dtype(hidden.dtype)
    logits = hidden.reshape(-1, hidden.shape[-1]).to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return _forward_reference(
        logits,
        targets.reshape(-1),
        None if mask is None else mask.reshape(-1),
        None if ref_logprobs is None else ref_logprobs.reshape(-1),
        temperature,
        kl_estimator,
        want_entropy,
    )


def _linear_backward_reference(
    grad_logprobs,
    grad_entropy,
    grad_kl,
    hidden,
    weight,
    bias,
    targets,
    mask,
    ref_logprobs,
    logprobs,
    entropy,
    lse,
    temperature,
    kl_estimator,
    need_hidden,
    need_weight,
):
    dtype = _output_dtype(hidden.dtype)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    logits = flat_hidden @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    grad_logits = _backward_reference(
        grad_logprobs.reshape(-1),
        grad_entropy,
        grad_kl,
        logits,
        targets.reshape(-1),
        None if mask is None else mask.reshape(-1),
        ref_logprobs,
        logprobs,
        entropy,
        lse,
        temperature,
        kl_estimator,
    )
    return _linear_grads_from_logit_grads(
        grad_logits, flat_hidden, hidden, weight, bias, need_hidden, need_weight
    )


def _linear_grads_from_logit_grads(grad_logits, flat_hidden, hidden, weight, bias, need_hidden, need_weight):
    grad_hidden = (
        (grad_logits @ weight.to(grad_logits.dtype)).to(hidden.dtype).reshape(hidden.shape)
        if need_hidden
        else hidden.new_empty(0)
    )
    grad_weight = (grad_logits.T @ flat_hidden).to(weight.dtype) if need_weight else weight.new_empty(0)
    grad_bias = (
        grad_logits.sum(0).to(bias.dtype) if (bias is not None and need_weight) else weight.new_empty(0)
    )
    return grad_hidden, grad_weight, grad_bias


def _linear_tile_logits(hidden_rows, weight_t, bias, begin, end, inv_temp):
    """z = (h @ W[begin:end]ᵀ + b[begin:end]) / τ for one tile, in the compute dtype (one GEMM, τ folded in)."""
    columns = weight_t[:, begin:end]
    if bias is None:
        logits = torch.mm(hidden_rows, columns)
        return logits.mul_(inv_temp) if inv_temp != 1.0 else logits
    return torch.addmm(bias[begin:end], hidden_rows, columns, beta=inv_temp, alpha=inv_temp)


def _row_blocks(valid_rows: torch.Tensor | None, count: int, step: int):
    """(index, length) of consecutive row blocks: slices when every row is valid, index tensors otherwise."""
    for begin in range(0, count, step):
        end = min(begin + step, count)
        yield (slice(begin, end) if valid_rows is None else valid_rows[begin:end]), end - begin


def _linear_forward_chunked(
    hidden, weight, bias, targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy
):
    dtype = _output_dtype(hidden.dtype)
    compute = _linear_compute_dtype(hidden)
    rows, vocab = targets.numel(), weight.shape[0]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    weight_t = weight.to(compute).T
    bias_c = None if bias is None else bias.to(compute)
    inv_temp = 1.0 / temperature
    logp = torch.zeros(rows, dtype=dtype, device=hidden.device)
    lse = torch.zeros_like(logp)
    entropy = torch.zeros_like(logp) if want_entropy else logp.new_empty(0)
    valid_rows = _valid_rows(mask)
    count = rows if valid_rows is None else valid_rows.numel()
    tile_rows, tile_cols = _linear_tiles(count, vocab)
    for index, length in _row_blocks(valid_rows, count, tile_rows):
        block_hidden = (flat_hidden[index] if valid_rows is None else flat_hidden.index_select(0, index)).to(
            compute
        )
        block_targets = flat_targets[index]
        stats = _RunningRowStats(length, dtype, hidden.device, want_entropy)
        for begin in range(0, vocab, tile_cols):
            z = _linear_tile_logits(block_hidden, weight_t, bias_c, begin, begin + tile_cols, inv_temp)
            stats.update(z, block_targets - begin, 1.0)
        block_logp, block_entropy, block_lse = stats.finish()
        logp[index], lse[index] = block_logp, block_lse
        if want_entropy:
            entropy[index] = block_entropy
    valid = None if mask is None else mask.reshape(-1).bool()
    return logp, entropy, _kl_output(logp, ref_logprobs, kl_estimator, valid), lse


def _linear_backward_chunked(
    grad_logprobs,
    grad_entropy,
    grad_kl,
    hidden,
    weight,
    bias,
    targets,
    mask,
    ref_logprobs,
    logprobs,
    entropy,
    lse,
    temperature,
    kl_estimator,
    need_hidden,
    need_weight,
):
    dtype = _output_dtype(hidden.dtype)
    compute = _linear_compute_dtype(hidden)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    rows, vocab = targets.numel(), weight.shape[0]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    weight_c = weight.to(compute)
    bias_c = None if bias is None else bias.to(compute)
    inv_temp = 1.0 / temperature
    a, b = _row_coefficients(
        grad_logprobs, grad_entropy, grad_kl, logprobs, ref_logprobs, kl_estimator, inv_temp, dtype
    )
    flat_entropy = entropy.reshape(-1).to(dtype) if b is not None else None
    flat_lse = lse.reshape(-1).to(dtype)
    grad_hidden = torch.zeros_like(flat_hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
    grad_bias = (
        torch.zeros(vocab, dtype=accumulate, device=weight.device)
        if (need_weight and bias is not None)
        else None
    )
    valid_rows = _valid_rows(mask)
    count = rows if valid_rows is None else valid_rows.numel()
    tile_rows, tile_cols = _linear_tiles(count, vocab)
    for index, _ in _row_blocks(valid_rows, count, tile_rows):
        block_hidden = (flat_hidden[index] if valid_rows is None else flat_hidden.index_select(0, index)).to(
            compute
        )
        block_hidden_acc = block_hidden.to(accumulate)
        block_targets, block_lse, block_a = flat_targets[index], flat_lse[index], a[index]
        block_b = None if b is None else b[index]
        block_entropy = None if b is None else flat_entropy[index]
        block_grad_hidden = (
            torch.zeros(block_hidden.shape, dtype=compute, device=hidden.device) if need_hidden else None
        )
        for begin in range(0, vocab, tile_cols):
            end = min(begin + tile_cols, vocab)
            z = _linear_tile_logits(block_hidden, weight_c.T, bias_c, begin, end, inv_temp)
            grad_z = _tile_grad_logits(
                z, block_targets - begin, 1.0, block_lse, block_a, block_b, block_entropy, compute
            )
            if need_hidden:
                block_grad_hidden.addmm_(grad_z, weight_c[begin:end])
            if need_weight:
                grad_weight[begin:end].addmm_(grad_z.T.to(accumulate), block_hidden_acc)
                if grad_bias is not None:
                    grad_bias[begin:end] += grad_z.sum(0)
        if need_hidden:
            grad_hidden[index] = block_grad_hidden.to(hidden.dtype)
    return (
        grad_hidden.reshape(hidden.shape) if need_hidden else grad_hidden,
        grad_weight.to(weight.dtype) if need_weight else weight.new_empty(0),
        grad_bias.to(bias.dtype) if grad_bias is not None else weight.new_empty(0),
    )


# ----------------------------------------------------------------------------------------------------------
# From hidden states × LM head: the custom ops and their autograd.
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("rlhf_fast::linear_token_logprobs_forward", mutates_args=())
def _linear_token_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    temperature: float,
    kl_estimator: str,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logprobs, entropy or [0], kl or [0], lse), each of targets' shape, float32 (float64)."""
    args = (hidden, weight, bias, targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy)
    backend = _pick_backend("linear_token_logprobs", hidden.device, hidden.dtype)
    if backend == "triton":
        from rlhf_fast.ops.triton.linear_logprob import linear_token_logprobs_forward_triton

        outputs = linear_token_logprobs_forward_triton(*args)
    elif backend == "chunked":
        outputs = _linear_forward_chunked(*args)
    else:
        outputs = _linear_forward_reference(*args)
    return _shape_outputs(outputs, targets.shape, want_entropy, ref_logprobs is not None)


@_linear_token_logprobs_forward.register_fake
def _(hidden, weight, bias, targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy):
    return _fake_forward_outputs(hidden, targets, ref_logprobs, want_entropy)


@torch.library.custom_op("rlhf_fast::linear_token_logprobs_backward", mutates_args=())
def _linear_token_logprobs_backward(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    kl_estimator: str,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dL/dhidden or [0], dL/dweight or [0], dL/dbias or [0]) in the inputs' dtypes."""
    args = (
        grad_logprobs,
        grad_entropy,
        grad_kl,
        hidden,
        weight,
        bias,
        targets,
        mask,
        ref_logprobs,
        logprobs,
        entropy,
        lse,
        temperature,
        kl_estimator,
        need_hidden,
        need_weight,
    )
    backend = _pick_backend("linear_token_logprobs", hidden.device, hidden.dtype)
    if backend == "triton":
        from rlhf_fast.ops.triton.linear_logprob import linear_token_logprobs_backward_triton

        return linear_token_logprobs_backward_triton(*args)
    if backend == "chunked":
        return _linear_backward_chunked(*args)
    return _linear_backward_reference(*args)


@_linear_token_logprobs_backward.register_fake
def _(
    grad_logprobs,
    grad_entropy,
    grad_kl,
    hidden,
    weight,
    bias,
    targets,
    mask,
    ref_logprobs,
    logprobs,
    entropy,
    lse,
    temperature,
    kl_estimator,
    need_hidden,
    need_weight,
):
    with_bias = bias is not None and need_weight
    return (
        hidden.new_empty(hidden.shape if need_hidden else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        weight.new_empty(bias.shape if with_bias else (0,)),
    )


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy = inputs
    logprobs, entropy, _, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, mask, ref_logprobs, logprobs, entropy, lse)
    ctx.temperature, ctx.kl_estimator, ctx.want_entropy = temperature, kl_estimator, want_entropy


def _linear_autograd_backward(ctx, grad_logprobs, grad_entropy, grad_kl, _grad_lse):
    hidden, weight, bias, targets, mask, ref_logprobs, logprobs, entropy, lse = ctx.saved_tensors
    need_hidden = ctx.needs_input_grad[0]
    need_weight = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
    if not (need_hidden or need_weight):
        return (None,) * 9
    grad_hidden, grad_weight, grad_bias = _linear_token_logprobs_backward(
        *_output_grads(ctx, grad_logprobs, grad_entropy, grad_kl, logprobs, ref_logprobs),
        hidden,
        weight,
        bias,
        targets,
        mask,
        ref_logprobs,
        logprobs,
        entropy,
        lse,
        ctx.temperature,
        ctx.kl_estimator,
        need_hidden,
        need_weight,
    )
    return (
        grad_hidden if ctx.needs_input_grad[0] else None,
        grad_weight if ctx.needs_input_grad[1] else None,
        grad_bias if bias is not None and ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_linear_token_logprobs_forward.register_autograd(
    _linear_autograd_backward, setup_context=_linear_setup_context
)


# ----------------------------------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------------------------------


def _check_common(
    name: str,
    reference: torch.Tensor,
    leading: torch.Size,
    vocab: int,
    targets,
    ref_logprobs,
    mask,
    temperature,
    kl_estimator,
    return_entropy,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Checks the arguments both public functions share; returns (mask as bool or None, ref_logprobs detached)."""
    check_tensor("targets", targets)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got dtype {targets.dtype}")
    if targets.shape != leading:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}, expected {tuple(leading)} "
            f"(the leading dimensions of {name})"
        )
    if ref_logprobs is not None:
        check_tensor("ref_logprobs", ref_logprobs, floating=True)
        if ref_logprobs.shape != leading:
            raise ValueError(f"ref_logprobs has shape {tuple(ref_logprobs.shape)}, expected {tuple(leading)}")
    if mask is not None:
        check_mask("mask", mask, leading)
        mask = mask if mask.dtype == torch.bool else mask != 0
    check_same_device(name, reference, targets=targets, ref_logprobs=ref_logprobs, mask=mask)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (0.0 < float(temperature) < float("inf"))
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy must be a bool, got {return_entropy!r}")  # noqa: TRY004 (project rule)
    if value_checks_enabled() and targets.numel():
        checked = targets if mask is None else targets[mask]
        if checked.numel() and (bool((checked < 0).any()) or bool((checked >= vocab).any())):
            raise ValueError(
                f"targets must lie in [0, {vocab}) at every valid token, got values in "
                f"[{int(checked.min())}, {int(checked.max())}]"
            )
    if ref_logprobs is not None and ref_logprobs.requires_grad:
        ref_logprobs = ref_logprobs.detach()
    return mask, ref_logprobs


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_estimator: str = "k1",
    return_entropy: bool = False,
) -> TokenLogprobs:
    """Log-prob of each target token under softmax(logits / temperature), with optional entropy and KL.

    logits: [..., V] float32/bfloat16/float16 (float64 for testing), any strides; targets: [...] integer ids;
    ref_logprobs: [...] float, the reference policy's log-probs of the same tokens (enables `kl`; no gradient);
    mask: [...] bool/integer, nonzero = compute this token (others come back 0 with zero gradient).
    kl_estimator: "k1" | "k2" | "k3" (see the module docstring); return_entropy: also return the entropy.

    Returns TokenLogprobs(logprobs, entropy, kl), each float32 [...] (entropy/kl None unless asked for),
    differentiable with respect to logits through logprobs, entropy and kl.
    """
    check_tensor("logits", logits, floating=True)
    if logits.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension, got a 0-dim tensor")
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    mask, ref_logprobs = _check_common(
        "logits",
        logits,
        logits.shape[:-1],
        logits.shape[-1],
        targets,
        ref_logprobs,
        mask,
        temperature,
        kl_estimator,
        return_entropy,
    )
    logp, entropy, kl, _ = _token_logprobs_forward(
        logits, targets, mask, ref_logprobs, float(temperature), kl_estimator, return_entropy
    )
    return TokenLogprobs(logp, entropy if return_entropy else None, kl if ref_logprobs is not None else None)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_estimator: str = "k1",
    return_entropy: bool = False,
) -> TokenLogprobs:
    """`token_logprobs` of the logits hidden @ weight.T + bias, without materializing them.

    hidden: [..., d] float32/bfloat16/float16; weight: [V, d] (the LM head) and bias: [V], same dtype as hidden;
    the other arguments and the result are those of `token_logprobs`. Gradients flow to hidden, weight and bias.
    """
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, ndim=2, floating=True)
    if hidden.dim() == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} but weight has shape {tuple(weight.shape)}: "
            "the last dimension of hidden must equal weight.shape[1]"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}: cast one to the other"
        )
    if bias is not None:
        check_tensor("bias", bias, ndim=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but weight has {weight.dtype}")
    check_same_device("hidden", hidden, weight=weight, bias=bias)
    mask, ref_logprobs = _check_common(
        "hidden",
        hidden,
        hidden.shape[:-1],
        weight.shape[0],
        targets,
        ref_logprobs,
        mask,
        temperature,
        kl_estimator,
        return_entropy,
    )
    logp, entropy, kl, _ = _linear_token_logprobs_forward(
        hidden, weight, bias, targets, mask, ref_logprobs, float(temperature), kl_estimator, return_entropy
    )
    return TokenLogprobs(logp, entropy if return_entropy else None, kl if ref_logprobs is not None else None)
