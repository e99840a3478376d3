"""Choosing the next token from logits: temperature, top-k / top-p filtering, inverse-CDF sampling, entropy.

``TokenSelector`` is what the sampler's decode step calls on each step's fp32 logits: it scales, filters and draws
(or takes the argmax) on the device, without reading anything back to the host, and returns the drawn tokens with
their log-probs and the entropy when asked. ``filter_logits`` and ``entropy_of_logits`` are the same math for
callers outside the loop: the PPO trainer scores sampled tokens again under the filtered distribution.
"""

from __future__ import annotations

import copy

import torch

from rlhf_fast.ops.sample_tokens import entropy_of_log_probs, sample_tokens, token_statistics


class TokenSelector:
    """Picks the next token from fp32 logits without reading anything back to the host.

    Sampling inverts the CDF: one uniform U per row, scaled by the row's total mass c_V, picks the first token
    whose cumulative probability c_i exceeds it (``cumsum`` + ``searchsorted``: no ``multinomial``, which may
    read back to the host, and all capturable in a CUDA graph). A [B, V] Gumbel draw with two logs per entry
    (Gumbel-max) picks from the same distribution at 3-4x the cost per step. Filtered tokens have probability 0,
    an empty interval of the CDF, and are never picked.
    """

    def __init__(
        self,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        generator: torch.Generator | None,
        filtered_logprobs: bool = False,
    ):
        if (
            not isinstance(temperature, (int, float))
            or isinstance(temperature, bool)
            or not 0 <= temperature < float("inf")
        ):
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = float(top_p)
        self.generator = generator
        self.filtered_logprobs = bool(filtered_logprobs)

    def drawing_from(self, generator: torch.Generator) -> TokenSelector:
        """The same settings, with the sampling noise drawn from ``generator``."""
        selector = copy.copy(self)
        selector.generator = generator
        return selector

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p removes tokens from the sampled distribution."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] fp32 -> the temperature-scaled logits."""
        return logits if self.greedy or self.temperature == 1.0 else logits / self.temperature

    def filtered(self, scaled: torch.Tensor) -> torch.Tensor:
        """Top-k then top-p on scaled logits [..., V]; removed tokens get -inf."""
        return filter_logits(scaled, self.top_k, self.top_p)

    def __call__(
        self, logits: torch.Tensor, want_logprobs: bool, want_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """logits: [B, V] fp32 -> (tokens [B] int64, log-probs [B] fp32 of those tokens or None, entropy [B]
        fp32 or None), log-prob and entropy under the unfiltered or (``filtered_logprobs``) filtered distribution."""
        scaled = self.scaled(logits)
        if self.greedy:
            tokens = scaled.argmax(dim=-1)
        else:
            filtered = self.filtered(scaled) if self.filters else scaled
            if not self.filters or self.filtered_logprobs:  # draw and statistics from one distribution
                return sample_tokens(filtered, self._uniform(filtered), want_logprobs, want_entropy)
            tokens = self.inverse_cdf_sample(filtered)
        return tokens, *token_statistics(scaled, tokens, want_logprobs, want_entropy)

    def inverse_cdf_sample(self, filtered: torch.Tensor) -> torch.Tensor:
        """[B, V] (filtered) scaled logits -> [B] int64 tokens drawn from their softmax, one uniform per row."""
        return sample_tokens(filtered, self._uniform(filtered), False, False)[0]

    def _uniform(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.rand((logits.shape[0], 1), generator=self.generator, device=logits.device)


def filter_logits(
    scaled: torch.Tensor, top_k: int, top_p: float, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-k then top-p on scaled logits [..., V] (as transformers' ``generate``); removed tokens get -inf.

    keep: optional [...] token ids that stay whatever the filter says (a sampled token scored again, whose
    logit may sit on the filter's edge after a different summation order)."""
    vocab = scaled.shape[-1]
    drop = None
    if 0 < top_k < vocab:
        kth_largest = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        drop = scaled < kth_largest
        scaled = scaled.masked_fill(drop, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # A token is dropped when the tokens ranked above it already reach top_p; the top one always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        dropped = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        drop = dropped if drop is None else drop | dropped
    if drop is None:
        return scaled
    if keep is not None:
        drop = drop.scatter(-1, keep[..., None], False)
    return scaled.masked_fill(drop, float("-inf"))


def entropy_of_logits(logits: torch.Tensor, log_normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy [...] of softmax(logits [..., V]); -inf logits (filtered tokens) contribute nothing."""
    if log_normalizer is None:
        log_normalizer = torch.logsumexp(logits, dim=-1)
    return entropy_of_log_probs(logits - log_normalizer[..., None])
