"""The `cpp` backend (the CPU default where the extension is built): the `chunked` backend's tiling, with each
tile's arithmetic in C++ (csrc/cpu/logprob_tiles.cpp).

Per tile the torch composition makes about a dozen passes over [n, C] (max, shift, exp, clamp, sums, a
batched dot product; in backward exp, products, a scatter); the kernels make one or two per row, and the
gradient overwrites the recomputed logits instead of allocating. The GEMMs (hidden × LM head, and backward's
dL/dhidden and dL/dW) stay torch's. Tiles are float32 or float64; a bfloat16 / float16 tile of the caller's
logits is converted first. bench/RESULTS.md has the ratio against `chunked`.
"""

from __future__ import annotations

import torch

from rlhf_fast import _extension
from rlhf_fast.ops.logprob import chunked


def _fold(stats, logits: torch.Tensor, local_targets: torch.Tensor, inv_temp: float) -> None:
    if logits.dtype != stats.dtype or logits.stride(-1) != 1:
        logits = logits.to(stats.dtype).contiguous()
    _extension.kernels().logprob_fold_tile(
        logits, local_targets, inv_temp, stats.max, stats.sum_exp, stats.sum_shifted, stats.target_logit
    )


def _grad(logits, local_targets, inv_temp, lse, a, b, entropy, dtype, scratch) -> torch.Tensor:
    if logits.dtype != dtype or logits.stride(-1) != 1:
        logits, scratch = logits.to(dtype).contiguous(), True
    out = logits if scratch else torch.empty_like(logits)
    rows = (None if row is None else row.to(dtype).contiguous() for row in (lse, a, b, entropy))
    _extension.kernels().logprob_grad_tile(logits, local_targets, inv_temp, *rows, out)
    return out


CPP_TILES = chunked.TileMath(_fold, _grad)


def forward(logits, spec):
    return chunked.forward(logits, spec, CPP_TILES)


def backward(logits, spec, grads):
    return chunked.backward(logits, spec, grads, CPP_TILES)


def linear_forward(hidden, weight, bias, spec):
    return chunked.linear_forward(hidden, weight, bias, spec, CPP_TILES)


def linear_backward(hidden, weight, bias, spec, grads, need_hidden, need_weight):
    return chunked.linear_backward(hidden, weight, bias, spec, grads, need_hidden, need_weight, CPP_TILES)
