"""What every backend of an op agrees on: limits, constants, the output-dtype rule, shared reductions.

The Python ops, their Triton kernels and the compiled kernels all read these from here (the compiled ones
receive them as arguments, or are checked against them in tests/ops), so each is defined once.
"""

from __future__ import annotations

import torch

# GAE whitening: (A − mean) / sqrt(unbiased var + WHITEN_EPS). Passed to the C++/CUDA kernels per call.
WHITEN_EPS = 1e-8

# Completions per prompt the ranking kernels take: a group fits one 16-wide tile (C++ arrays, a CUDA
# half-warp, a Triton block). csrc/kernels/constants.h holds the same number for the compiled kernels; a
# test checks that they agree. The data layer's limit on a ranking (data.records.MAX_COMPLETIONS, 9 as in
# InstructGPT) is a different rule about the data and must stay at or below this one.
MIN_GROUP, MAX_GROUP = 2, 16

# Schulman's estimators of KL(π‖π_ref) from samples of π; the Triton kernels take them as codes (0: no KL).
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_CODES = {"k1": 1, "k2": 2, "k3": 3}


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Every op's float outputs: float32, or float64 for float64 inputs (the testing dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ranking_outputs_from_prompt_stats(
    term_sums: torch.Tensor, pair_counts: torch.Tensor, correct_counts: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ranking loss (loss, accuracy, prompt weights) from per-prompt sums of −log σ, pair counts and correct
    counts (see rlhf_fast/ops/ranking.py)."""
    pairs = pair_counts.to(dtype)
    has_pairs = pair_counts > 0
    prompts_with_pairs = has_pairs.sum().to(dtype)
    prompt_means = term_sums.to(dtype) / pairs.clamp(min=1)
    loss = prompt_means.sum() / prompts_with_pairs.clamp(min=1)
    accuracy = correct_counts.sum().to(dtype) / pairs.sum().clamp(min=1)
    weights = torch.where(has_pairs, 1 / (pairs.clamp(min=1) * prompts_with_pairs.clamp(min=1)), 0)
    return loss, accuracy, weights
