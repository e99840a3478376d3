"""The `chunked` backend: plain torch over cache-sized tiles (the CPU default where the extension is not built).

From logits, rows go in blocks of `CHUNK_ELEMENTS // V`; from hidden × LM head, tiles of `LINEAR_TILE_ROWS`
rows × (`CHUNK_ELEMENTS` / rows) vocabulary columns, so the [N, V] logits never exist at once: each tile is
folded into per-row online-softmax statistics, and backward recomputes it. Masked rows are dropped before
any work (finding them is a host sync).

The tiling is shared with the `cpp` backend (cpp.py), which passes its own `TileMath`: the two per-tile steps
(fold a tile into the statistics; a tile's dL/dz) in C++ instead of the torch composition `TORCH_TILES` here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from rlhf_fast.ops._contract import output_dtype
from rlhf_fast.ops.logprob.spec import LogprobGrads, LogprobSpec, kl_output

# Elements of the largest temporary per tile (1 MiB of float32): small enough that its several passes over a
# tile run in cache.
CHUNK_ELEMENTS = 2**18
# Rows per tile of the hidden × LM head path (the columns follow from CHUNK_ELEMENTS).
LINEAR_TILE_ROWS = 256
# log p (or z − max) is clamped here where it matters only through p = exp(.), which is exactly 0 below it in
# float32 and float64 alike: −inf logits then give p·log p = 0 instead of NaN, with finite products.
LOG_ZERO = -1e4


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


def _tile_grad_logits(logits, local_targets, inv_temp, lse, a, b, entropy, dtype, scratch) -> torch.Tensor:
    """dL/dz for one tile of logits [n, C] (z = logits·inv_temp), in `dtype`; a and b already carry the 1/τ of
    dz/dlogits (see the package docstring); `local_targets` counts from the tile's first column. `scratch`:
    the tile is a temporary the result may overwrite (this version always writes a new tensor)."""
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


class TileMath(NamedTuple):
    """A backend's two per-tile steps: `fold(stats, logits [n, C], local_targets [n], inv_temp)` folds a tile
    into the rows' `_RunningRowStats`; `grad(logits, local_targets, inv_temp, lse, a, b, entropy, dtype,
    scratch)` returns the tile's dL/dz in `dtype`, over the tile itself where `scratch` allows."""

    fold: Callable[..., None]
    grad: Callable[..., torch.Tensor]


TORCH_TILES = TileMath(_RunningRowStats.update, _tile_grad_logits)


class _RowBlocks:
    """The valid rows of one call, in consecutive blocks: slices when every row is valid, else index tensors
    (finding the valid rows is a host sync)."""

    def __init__(self, spec: LogprobSpec):
        valid = spec.flat_valid()
        self.rows = None if valid is None or bool(valid.all()) else valid.nonzero().squeeze(-1)
        self.count = spec.rows if self.rows is None else self.rows.numel()

    @property
    def all_valid(self) -> bool:
        return self.rows is None

    def __call__(self, step: int):
        """(index, length) of each block of at most `step` rows."""
        for begin in range(0, self.count, step):
            end = min(begin + step, self.count)
            yield (slice(begin, end) if self.rows is None else self.rows[begin:end]), end - begin

    @staticmethod
    def take(flat: torch.Tensor, index) -> torch.Tensor:
        return flat[index] if isinstance(index, slice) else flat.index_select(0, index)


class _PerRowOutputs:
    """The flat forward outputs, filled block by block (0 at rows never filled: masked ones)."""

    def __init__(self, spec: LogprobSpec, dtype: torch.dtype, device: torch.device):
        self.spec = spec
        self.logp = torch.zeros(spec.rows, dtype=dtype, device=device)
        self.lse = torch.zeros_like(self.logp)
        self.entropy = torch.zeros_like(self.logp) if spec.want_entropy else self.logp.new_empty(0)

    def store(self, index, stats: _RunningRowStats) -> None:
        block_logp, block_entropy, block_lse = stats.finish()
        self.logp[index], self.lse[index] = block_logp, block_lse
        if self.spec.want_entropy:
            self.entropy[index] = block_entropy

    def finish(self):
        return self.logp, self.entropy, kl_output(self.logp, self.spec), self.lse


# ----------------------------------------------------------------------------------------------------------
# From logits.
# ----------------------------------------------------------------------------------------------------------


def forward(logits: torch.Tensor, spec: LogprobSpec, tiles: TileMath = TORCH_TILES):
    dtype = output_dtype(logits.dtype)
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), spec.flat_targets()
    outputs, blocks = _PerRowOutputs(spec, dtype, logits.device), _RowBlocks(spec)
    for index, length in blocks(max(1, CHUNK_ELEMENTS // max(logits.shape[-1], 1))):
        stats = _RunningRowStats(length, dtype, logits.device, spec.want_entropy)
        tiles.fold(stats, blocks.take(flat, index), flat_targets[index], spec.inv_temp)
        outputs.store(index, stats)
    return outputs.finish()


def backward(
    logits: torch.Tensor, spec: LogprobSpec, grads: LogprobGrads, tiles: TileMath = TORCH_TILES
) -> torch.Tensor:
    dtype = output_dtype(logits.dtype)
    vocab = logits.shape[-1]
    flat, flat_targets = logits.reshape(-1, vocab), spec.flat_targets()
    a, b = grads.row_coefficients(spec, dtype)
    flat_entropy = grads.entropy.reshape(-1).to(dtype) if b is not None else None
    flat_lse = grads.lse.reshape(-1).to(dtype)
    blocks = _RowBlocks(spec)
    allocate = torch.empty if blocks.all_valid else torch.zeros
    grad_logits = allocate(spec.rows, vocab, dtype=logits.dtype, device=logits.device)
    for index, _ in blocks(max(1, CHUNK_ELEMENTS // max(vocab, 1))):
        block_grad = tiles.grad(
            blocks.take(flat, index),
            flat_targets[index],
            spec.inv_temp,
            flat_lse[index],
            a[index],
            None if b is None else b[index],
            None if b is None else flat_entropy[index],
            dtype,
            False,
        )
        grad_logits[index] = block_grad.to(logits.dtype)
    return grad_logits.reshape(logits.shape)


# ----------------------------------------------------------------------------------------------------------
# From hidden states × LM head.
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    # On a CPU low-precision matmuls are no faster and round the logits: compute them in float32 there.
    if hidden.dtype == torch.float64:
        return torch.float64
    return torch.float32 if hidden.device.type == "cpu" else hidden.dtype


def _linear_tiles(rows: int, vocab: int) -> tuple[int, int]:
    """(rows, columns) of one tile."""
    tile_rows = max(1, min(rows, LINEAR_TILE_ROWS))
    return tile_rows, max(1, min(vocab, CHUNK_ELEMENTS // tile_rows))


def _tile_logits(hidden_rows, weight_t, bias, begin, end, inv_temp):
    """z = (h @ W[begin:end]ᵀ + b[begin:end]) / τ for one tile, in the compute dtype (one GEMM, τ folded in)."""
    columns = weight_t[:, begin:end]
    if bias is None:
        logits = torch.mm(hidden_rows, columns)
        return logits.mul_(inv_temp) if inv_temp != 1.0 else logits
    return torch.addmm(bias[begin:end], hidden_rows, columns, beta=inv_temp, alpha=inv_temp)


def linear_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: LogprobSpec,
    tiles: TileMath = TORCH_TILES,
):
    dtype, compute = output_dtype(hidden.dtype), _compute_dtype(hidden)
    vocab = weight.shape[0]
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), spec.flat_targets()
    weight_t = weight.to(compute).T
    bias_c = None if bias is None else bias.to(compute)
    outputs, blocks = _PerRowOutputs(spec, dtype, hidden.device), _RowBlocks(spec)
    tile_rows, tile_cols = _linear_tiles(blocks.count, vocab)
    for index, length in blocks(tile_rows):
        block_hidden = blocks.take(flat_hidden, index).to(compute)
        block_targets = flat_targets[index]
        stats = _RunningRowStats(length, dtype, hidden.device, spec.want_entropy)
        for begin in range(0, vocab, tile_cols):
            z = _tile_logits(block_hidden, weight_t, bias_c, begin, begin + tile_cols, spec.inv_temp)
            tiles.fold(stats, z, block_targets - begin, 1.0)
        outputs.store(index, stats)
    return outputs.finish()


def linear_backward(
    hidden,
    weight,
    bias,
    spec: LogprobSpec,
    grads: LogprobGrads,
    need_hidden: bool,
    need_weight: bool,
    tiles: TileMath = TORCH_TILES,
):
    dtype, compute = output_dtype(hidden.dtype), _compute_dtype(hidden)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    vocab = weight.shape[0]
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), spec.flat_targets()
    weight_c = weight.to(compute)
    bias_c = None if bias is None else bias.to(compute)
    a, b = grads.row_coefficients(spec, dtype)
    flat_entropy = grads.entropy.reshape(-1).to(dtype) if b is not None else None
    flat_lse = grads.lse.reshape(-1).to(dtype)
    grad_hidden = torch.zeros_like(flat_hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
    with_bias = need_weight and bias is not None
    grad_bias = torch.zeros(vocab, dtype=accumulate, device=weight.device) if with_bias else None
    blocks = _RowBlocks(spec)
    tile_rows, tile_cols = _linear_tiles(blocks.count, vocab)
    for index, _ in blocks(tile_rows):
        block_hidden = blocks.take(flat_hidden, index).to(compute)
        block_hidden_acc = block_hidden.to(accumulate)
        block_targets, block_lse, block_a = flat_targets[index], flat_lse[index], a[index]
        block_b = None if b is None else b[index]
        block_entropy = None if b is None else flat_entropy[index]
        block_grad_hidden = (
            torch.zeros(block_hidden.shape, dtype=compute, device=hidden.device) if need_hidden else None
        )
        for begin in range(0, vocab, tile_cols):
            end = min(begin + tile_cols, vocab)
            z = _tile_logits(block_hidden, weight_c.T, bias_c, begin, end, spec.inv_temp)
            grad_z = tiles.grad(
                z, block_targets - begin, 1.0, block_lse, block_a, block_b, block_entropy, compute, True
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
