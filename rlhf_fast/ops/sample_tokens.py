"""One decoding step's draw: from scaled logits [B, V] (float32; −inf marks a filtered token) and one uniform
U ∈ [0, 1) per row, the token whose interval of the cumulative distribution holds U·total (inverse-CDF
sampling), its log-prob, and the row's entropy, both under softmax(logits).

    c_i = Σ_{j ≤ i} softmax(logits)_j,   token = min{i : c_i > U·c_V}   (the last token with mass if none)
    log-prob = logits[token] − logsumexp(logits),   entropy = −Σ p_j log p_j

Backends: `reference` (the torch composition: softmax, cumsum, searchsorted, log_softmax, gather; on CUDA
capturable in a graph) and `cpp` (csrc/cpu/sample_tokens.cpp: two passes over each row, where the
composition writes a dozen [B, V] tensors; bench/RESULTS.md has the ratio). Both accumulate the CDF in
double, so they draw the same token but where U·c_V falls within rounding of an interval's edge.
"""

from __future__ import annotations

import torch

from rlhf_fast import _extension
from rlhf_fast.ops._backend import select_backend

IMPLEMENTED = ("reference", "cpp")


def sample_tokens_reference(
    logits: torch.Tensor, uniform: torch.Tensor, want_logprobs: bool = True, want_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(tokens [B] int64, log-probs [B] or None, entropy [B] or None) by the torch composition."""
    cdf = torch.softmax(logits, dim=-1).cumsum_(dim=-1)
    total = cdf[:, -1:]
    tokens = torch.searchsorted(cdf, uniform.reshape(total.shape) * total, right=True)
    # U·c_V may round up to c_V, past every interval: take then the last token with mass (the first to reach
    # c_V), never a filtered token after it.
    last = torch.searchsorted(cdf, total.contiguous())
    tokens = torch.minimum(tokens, last).squeeze(-1)
    return tokens, *token_statistics(logits, tokens, want_logprobs, want_entropy)


def token_statistics(
    logits: torch.Tensor, tokens: torch.Tensor, want_logprobs: bool, want_entropy: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(log-probs [B] of `tokens`, entropy [B]) under softmax(`logits` [B, V]), each None when not asked."""
    logprobs = entropy = None
    if want_logprobs or want_entropy:
        log_probs = torch.log_softmax(logits, dim=-1)  # one kernel (logsumexp takes several)
        if want_logprobs:
            logprobs = log_probs.gather(-1, tokens[:, None]).squeeze(-1)
        if want_entropy:
            entropy = entropy_of_log_probs(log_probs)
    return logprobs, entropy


def entropy_of_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy [...] of a distribution given as log-probs [..., V]; −inf entries contribute nothing."""
    probs = log_probs.exp()
    return -(probs * torch.where(probs > 0, log_probs, 0.0)).sum(-1)


def sample_tokens(
    logits: torch.Tensor, uniform: torch.Tensor, want_logprobs: bool = True, want_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Tokens drawn from softmax(`logits` [B, V] float32) by the uniforms `uniform` ([B] or [B, 1]), with
    their log-probs and the rows' entropy when asked (None otherwise); see the module docstring."""
    backend = select_backend("sample_tokens", logits.device, IMPLEMENTED, ())
    if backend == "reference" or logits.dtype != torch.float32 or torch.compiler.is_compiling():
        return sample_tokens_reference(logits, uniform, want_logprobs, want_entropy)
    tokens, logprobs, entropy = _extension.kernels().sample_tokens(logits, uniform)
    return tokens, logprobs if want_logprobs else None, entropy if want_entropy else None
